"""The device runtime of a boundary: the worker processes (spawned, one per device), their
control Pipes, the gloo group the agent shares with them (public `torch.distributed` APIs), the
pool that runs participation windows over them, and level-1 secure aggregation between them.
Model training itself (model, adapter, data, inner loop) is `echelon.training`; this package
runs it in processes. Import submodules directly: this package imports nothing heavy."""
