"""The MoE layer against a direct per-token reference, and its balancing machinery."""

import pytest
import torch
import torch.nn.functional as F

from loopmoe.model import moe as moe_module
from loopmoe.model.moe import SparseMoE


def reference_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: slow and obviously right.

    A DCCA layer (BigMac): each token is descended to width r, its k experts run and are combined
    at width r, the sum is ascended to d; the router reads x (or the descended x'), the shared
    experts always x.
    """
    low = F.linear(x, moe.descend.weight) if moe.descend is not None else x  # [N, w]
    logits = F.linear(low if moe.route_descended else x, moe.gate.weight)
    if moe.gate.score == "softmax":
        scores = torch.softmax(logits.float(), -1)
    else:
        scores = torch.sigmoid(logits.float())
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, idx = torch.topk(scores[t] + moe.gate.expert_bias, moe.top_k)
        w = scores[t][idx]
        if moe.gate.norm_topk_prob:
            w = w / w.sum()
        routed = torch.zeros_like(low[t])
        for weight, e in zip(w, idx):
            gate, up = F.linear(low[t], moe.experts.gate_up_proj[e]).chunk(2)
            routed += weight * F.linear(F.silu(gate) * up, moe.experts.down_proj[e])
        out[t] += F.linear(routed, moe.ascend.weight) if moe.ascend is not None else routed
        if moe.shared_experts is not None:
            out[t] += moe.shared_experts(x[t])
    return out


DCCA = {"expert_type": "dcca"}  # BigMac's low-dimension experts at r = d // 4 = 8


def make_moe(cfg):
    torch.manual_seed(0)
    moe = SparseMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"router_score": "sigmoid"},
        {"norm_topk_prob": False},
        {"shared_expert_intermediate_size": 24},
        {"router_bias_update_rate": 0.01, "router_score": "sigmoid"},
        DCCA,
        {**DCCA, "dcca_dim": 12, "dcca_router_input": "descended", "shared_expert_intermediate_size": 24},
        {**DCCA, "router_score": "sigmoid", "norm_topk_prob": False},
    ],
)
def test_dispatch_matches_per_token_reference(tiny_config, overrides):
    moe = make_moe(tiny_config(**overrides))
    if overrides.get("router_bias_update_rate"):
        moe.gate.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.2]))
    x = torch.randn(2, 7, 32)
    out, _ = moe(x)
    ref = reference_moe(moe, x.reshape(-1, 32)).view(2, 7, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expert_type", ["swiglu", "dcca"])
@pytest.mark.parametrize("tokens", [1, 3])  # the single-token fast path; groups of a few rows
def test_inference_paths_with_thread_split_matvecs_match_the_reference(tiny_config, tokens, expert_type):
    # Experts of 256 x 256 (DCCA: 128 x 256): large enough for layers.linear to split their matvecs across threads.
    dcca_dim = 128 if expert_type == "dcca" else None
    cfg = tiny_config(
        hidden_size=256, moe_intermediate_size=256, head_dim=64, expert_type=expert_type, dcca_dim=dcca_dim
    )
    moe = make_moe(cfg)
    for p in moe.parameters():
        p.data.mul_(0.1)
    x = torch.randn(1, tokens, 256)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out, _ = moe(x, router_stats=False)
    finally:
        torch.set_num_threads(before)
    ref = reference_moe(moe, x.reshape(-1, 256)).view(1, tokens, 256)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, DCCA])
def test_grouped_mm_path_matches_loop_forward(tiny_config, overrides):
    moe = make_moe(tiny_config(moe_implementation="loop", **overrides))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        loop, _ = moe(x)
        moe.experts.implementation = "grouped_mm"
        try:
            grouped, _ = moe(x)
        except RuntimeError as err:  # a torch build without a CPU grouped GEMM
            pytest.skip(f"torch._grouped_mm unavailable on CPU: {err}")
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_routed_expert(tiny_config):
    moe = make_moe(tiny_config())
    out, router = moe(torch.randn(4, 16, 32))
    (out.square().mean() + router.aux_loss).backward()
    hit = torch.zeros(4, dtype=torch.bool)
    hit[router.experts.unique()] = True
    grad_norm = moe.experts.gate_up_proj.grad.flatten(1).norm(dim=1)
    assert torch.all((grad_norm > 0) == hit)
    assert moe.gate.weight.grad.abs().sum() > 0


def test_aux_loss_is_one_when_router_is_uniform(tiny_config):
    moe = make_moe(tiny_config())
    torch.nn.init.zeros_(moe.gate.weight)
    _, router = moe(torch.randn(2, 9, 32))
    assert router.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert router.entropy.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    assert router.load.sum().item() == pytest.approx(1.0)


def test_z_loss_and_padding_mask(tiny_config):
    moe = make_moe(tiny_config())
    x = torch.randn(1, 6, 32)
    mask = torch.tensor([[False, False, True, True, True, True]])
    _, masked = moe(x, mask)
    _, tail = moe(x[:, 2:])
    torch.testing.assert_close(masked.load, tail.load)
    torch.testing.assert_close(masked.aux_loss, tail.aux_loss)
    logits = F.linear(x[0, 2:], moe.gate.weight)
    torch.testing.assert_close(masked.z_loss, torch.logsumexp(logits, -1).square().mean())


def test_loss_free_bias_moves_against_load(tiny_config):
    moe = make_moe(tiny_config(router_bias_update_rate=0.1))
    moe.train()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] += 5.0  # expert 0 wins for tokens with a positive sum
    x = torch.randn(4, 16, 32).abs()
    moe(x)
    counts = moe.gate.pending_counts.clone()
    assert counts[0] == counts.max() > counts.mean()
    moe.gate.update_bias(0.1, counts)
    assert moe.gate.expert_bias[0].item() == pytest.approx(-0.1)
    assert torch.all(moe.gate.pending_counts == 0)


def test_bias_changes_selection_not_weights(tiny_config):
    moe = make_moe(tiny_config(router_bias_update_rate=0.1, norm_topk_prob=False))
    x = torch.randn(1, 8, 32)
    _, _before = moe(x)
    moe.gate.expert_bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0]))
    out, after = moe(x)
    assert torch.all(after.experts.sort(-1).values == torch.tensor([0, 1]))
    torch.testing.assert_close(out, reference_moe(moe, x[0]).unsqueeze(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"shared_expert_intermediate_size": 24, "norm_topk_prob": False},
        {**DCCA, "shared_expert_intermediate_size": 24},
        {**DCCA, "dcca_router_input": "descended"},
    ],
)
def test_gradients_match_autograd_through_the_reference(tiny_config, overrides):
    """The dispatch's hand-written backward passes against plain autograd, in float64."""
    moe = make_moe(tiny_config(**overrides)).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 9, 32, dtype=torch.float64)
    out, _ = moe(x)
    (out * target).sum().backward()
    ours = {n: p.grad.clone() for n, p in moe.named_parameters()}
    ours_x = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    ref = reference_moe(moe, x.reshape(-1, 32)).view(2, 9, 32)
    (ref * target).sum().backward()
    for name, p in moe.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")
    torch.testing.assert_close(ours_x, x.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
def test_dcca_experts_run_on_r_wide_rows_through_either_kernel(tiny_config, monkeypatch, implementation):
    """A DCCA layer hands its experts' kernel, the CPU loop or the grouped GEMMs that ``auto`` picks
    on CUDA, the descended r-wide rows and r-wide 3-D weights (what the all_to_all would carry), and
    forward and backward equal the per-token reference."""
    moe = make_moe(tiny_config(moe_implementation=implementation, **DCCA, shared_expert_intermediate_size=24))
    calls = []
    kernel = getattr(moe_module, f"experts_{implementation}")

    def spy(x, w_gate_up, w_down, counts):
        calls.append((x.shape, w_gate_up.shape, w_down.shape))
        return kernel(x, w_gate_up, w_down, counts)

    monkeypatch.setattr(moe_module, f"experts_{implementation}", spy)
    x = torch.randn(2, 7, 32, requires_grad=True)
    try:
        out, _ = moe(x)
    except RuntimeError as err:  # a torch build without a CPU grouped GEMM
        pytest.skip(f"torch._grouped_mm unavailable on CPU: {err}")
    r, f, rows = 8, 16, 2 * 7 * 2
    assert calls == [((rows, r), (4, 2 * f, r), (4, r, f))]
    target = torch.randn_like(out)
    grads = torch.autograd.grad((out * target).sum(), [x, *moe.parameters()])
    ref = reference_moe(moe, x.reshape(-1, 32)).view(2, 7, 32)
    ref_grads = torch.autograd.grad((ref * target).sum(), [x, *moe.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip([("x", None), *moe.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
