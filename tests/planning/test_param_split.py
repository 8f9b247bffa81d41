"""The planner's per-layer parameters are the budget's (``budget.layer_params``), for every preset and
expert type: FSDP2 unit sizes, gathered weights and gradients are sized from them."""

import pytest

from loopmoe.budget import compute_budget, layer_params, layer_shapes
from loopmoe.config import ExpertType
from loopmoe.planning.memory import param_split
from loopmoe.presets import get_preset, list_presets


@pytest.mark.parametrize("expert_type", [t.value for t in ExpertType])
@pytest.mark.parametrize("preset", list(list_presets()))
def test_planner_layers_are_the_budgets(preset, expert_type):
    # Looped, with a prelude and a coda: core layers (IterAdaLN's modulation) and plain ones both count.
    cfg = get_preset(
        preset, expert_type=expert_type, dcca_dim=None, num_loops=2, num_prelude_layers=1, num_coda_layers=1
    )
    split = param_split(cfg, 128)
    E = cfg.num_experts
    assert split.layer_core == layer_params(layer_shapes(cfg, core=True), E)
    assert split.layer_plain == layer_params(layer_shapes(cfg, core=False), E)
    # The units add up to the budget's total: nothing of a layer is left out or counted twice.
    plain_layers = cfg.num_prelude_layers + cfg.num_coda_layers
    units = split.globals + plain_layers * split.layer_plain + cfg.num_core_layers * split.layer_core
    assert units == split.total == compute_budget(cfg, 128).total_params
