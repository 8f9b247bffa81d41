"""``loopmoe plan``: a simulation of one training step (the Pangu Ultra MoE method), to choose a model
shape and a parallel layout without trial runs. See docs/planning.md.

- ``hardware``: device profiles, which only describe (accelerators from ``loopmoe.hardware``'s spec
  sheets; ``cpu`` from a calibration);
- ``calibration``: measures this machine's ``cpu`` profile (gloo collectives included), caches it,
  and ``get_hardware`` returns any profile by name;
- ``kernel_timing``: seconds per GEMM / attention call on a profile (timed on a CPU);
- ``layout``: how a step is spread over devices, read from the trainer's ``RunConfig``;
- ``trace``: what a training step dispatches, op by op (matmul and attention shapes, bytes,
  transcendental work, op counts), traced on the real model under fake tensors;
- ``memory``, ``comm``: memory per device, α–β collectives (loop-aware FSDP2 gathering, expert all_to_all);
- ``cost``: compute per executed (iteration, layer) slot, and the whole step (``plan_step``);
- ``search``: shapes balanced against a Vanilla reference x layouts that fit, ranked.

Imports go one way: ``hardware``, ``layout`` and ``trace`` import nothing of the planner;
``kernel_timing`` reads ``hardware``; ``memory`` < ``comm`` < ``cost`` < ``search``; ``calibration``
sits on top (it times a tiny model's step and counts its FSDP2 collectives with ``comm``).
"""

from loopmoe.planning.calibration import get_hardware
from loopmoe.planning.cost import StepPlan, plan_step
from loopmoe.planning.hardware import HARDWARE_NAMES, Hardware
from loopmoe.planning.layout import Layout

__all__ = ["HARDWARE_NAMES", "Hardware", "Layout", "StepPlan", "get_hardware", "plan_step"]
