"""Benchmark harnesses behind `hyla bench ...`."""
