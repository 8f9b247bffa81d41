"""lm-eval task YAMLs for the shipped benchmarks, their local-file loaders and prompt functions."""
