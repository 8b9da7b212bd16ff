"""Transport-free training for the device plane: models, tokenizer, data, inner loop, and the
worker pool a boundary agent supervises. Import submodules directly; this package imports
nothing heavy, so `echelon.training.adapter` loads without transformers."""
