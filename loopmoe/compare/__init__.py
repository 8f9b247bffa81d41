"""The main job: a controlled LoopMoE vs Vanilla MoE comparison at matched budgets.

``options`` (what defines a comparison) -> ``arms`` (the models, balanced) -> ``runner`` (train, evaluate
with ``loopmoe.evaluation.pipeline``) -> ``results`` (results.json's schema) -> ``verdict`` (which pairs are
compared, what may be claimed) -> ``report`` (markdown) and ``figures`` (plots).
"""

from loopmoe.compare.options import CompareOptions
from loopmoe.compare.runner import run_comparison

__all__ = ["CompareOptions", "run_comparison"]
