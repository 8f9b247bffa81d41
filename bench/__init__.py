"""Benchmark scripts (not tests), run as modules from the repository root:
``python -m bench.run_all [--quick]`` or one of them, e.g. ``python -m bench.train_step --quick``;
see PERFORMANCE.md."""
