"""Transport-free model training for the device plane: models, adapter layout, tokenizer, data,
corpus text and the inner loop. The processes that run it (workers, pool, gloo group) are
`echelon.device`. Import submodules directly; this package imports nothing heavy, so
`echelon.training.adapter` loads without transformers."""
