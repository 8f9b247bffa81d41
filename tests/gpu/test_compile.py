"""``torch.compile`` of the whole model on the GPU (inductor): one graph, the eager logits.

On the H100: no graph break, ``fullgraph=True`` traced, logits equal eager's to 1.2e-6 (bound: 1e-4).
The first call compiles for about 16 s, hence ``slow``.
"""

import pytest

from bench.gpu_cases import build_model, compare, random_ids

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def test_compiled_inference_forward_equals_eager_without_graph_breaks(device):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from loopmoe.presets import get_preset

    cfg = get_preset("bench", num_loops=2)
    model = build_model(cfg, 0, device).eval()
    ids = random_ids(cfg.vocab_size, (4, 256), 7, device)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            eager = model(input_ids=ids, use_cache=False).logits
            compiled = torch.compile(model, backend="inductor")(input_ids=ids, use_cache=False).logits
        breaks = dict(counters.get("graph_break", {}))
        assert not breaks, f"graph breaks: {breaks}"
        errors = compare(compiled, eager)
        assert errors["max_abs"] <= 1e-4, errors
        torch._dynamo.reset()
        with torch.no_grad():  # raises at the first graph break
            torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids, use_cache=False)
    finally:
        torch._dynamo.reset()
