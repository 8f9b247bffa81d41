"""``loopmoe plan``: a simulation of one training step (the Pangu Ultra MoE method), to choose a model
shape and a parallel layout without trial runs. See docs/planning.md.

- ``hardware``: device profiles (spec sheets; ``cpu`` measured and cached);
- ``layout``: how a step is spread over devices, read from the trainer's ``RunConfig``;
- ``cost``: compute per executed (iteration, layer) slot, and the whole step (``plan_step``);
- ``memory``, ``comm``: memory per device, α–β collectives (loop-aware FSDP2 gathering, expert all_to_all);
- ``trace``: what a training step dispatches, op by op (matmul and attention shapes, bytes,
  transcendental work, op counts), traced on the real model under fake tensors;
- ``search``: shapes balanced against a Vanilla reference x layouts that fit, ranked.
"""

from loopmoe.planning.cost import StepPlan, plan_step
from loopmoe.planning.hardware import HARDWARE_NAMES, Hardware, get_hardware
from loopmoe.planning.layout import Layout

__all__ = ["HARDWARE_NAMES", "Hardware", "Layout", "StepPlan", "get_hardware", "plan_step"]
