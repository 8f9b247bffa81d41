"""Static-cache generation deeper than the cache was sized for: a clear ValueError, not an IndexError."""

import pytest
import torch

from loopmoe import LoopMoEForCausalLM
from loopmoe.presets import get_preset


def test_static_cache_with_more_loops_than_trained_says_what_to_do():
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(get_preset("debug", vocab_size=300, num_loops=2, num_core_layers=2)).eval()
    x = torch.randint(0, 300, (1, 5))
    with pytest.raises(ValueError, match=r"layer slots.*num_loops=4.*dynamic cache"):
        model.generate(x, max_new_tokens=2, cache_implementation="static", num_loops=4, do_sample=False)
    # the default (dynamic) cache grows for test-time depth
    assert model.generate(x, max_new_tokens=2, num_loops=4, do_sample=False).shape == (1, 7)
