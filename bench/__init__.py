"""Benchmark scripts (not tests): ``python bench/run_all.py [--quick]``; see PERFORMANCE.md."""
