"""Benchmarks, one module per section of jobs/bench.py."""
