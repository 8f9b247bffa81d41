"""The main job: a controlled LoopMoE vs Vanilla MoE comparison at matched budgets."""

from loopmoe.compare.runner import CompareOptions, run_comparison

__all__ = ["CompareOptions", "run_comparison"]
