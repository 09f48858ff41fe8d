"""The op sweep: speed, memory and numerics of every op of `hope_kernels.registry.OPS` against its
references and peers (`python -m benchmarks.ops`, also `python -m benchmarks`)."""
