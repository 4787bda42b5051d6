"""Benchmarks, one module per section of jobs/bench.py (`run(args)`, `add_arguments(parser)`);
harness.py holds the timing and tables they share."""
