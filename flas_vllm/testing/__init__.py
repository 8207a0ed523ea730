"""Tiny deterministic models and official-layout FLAS checkpoints built at run time, for tests, the demo and benchmarks."""
