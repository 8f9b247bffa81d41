"""Training the ``bench`` LoopMoE on the GPU: the bf16 loss curve against its recorded baseline and
against fp32, and forward + backward under every SDPA backend.

The model and recipe are the asset's (``tests/assets/bf16_loss_curve.json``; the run itself is
``bench.gpu_cases.bf16_loss_curve``). Tolerances are the asset's, with the reasons written there.
"""

import copy

import pytest
import torch

from bench.gpu_cases import (
    RECORD_HINT,
    autocast,
    baseline_config,
    bf16_loss_curve,
    build_model,
    compare,
    load_baselines,
    random_ids,
    train_run,
)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def asset() -> dict:
    return load_baselines()


@pytest.fixture(scope="module")
def bf16_run(asset) -> dict:
    return bf16_loss_curve(asset, torch.device("cuda"))


def relative_gaps(curve: list[float], reference: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(curve, reference)]


def test_bf16_loss_curve_matches_the_recorded_baseline(asset, device, request):
    name = torch.cuda.get_device_name(device)
    baseline = asset["baselines"].get(name)
    if baseline is None:
        pytest.skip(f"no recorded {name} bf16 baseline; record one with `{RECORD_HINT}`")
    bf16_run = request.getfixturevalue("bf16_run")  # after the skip: 20 steps for nothing otherwise
    tol = asset["tolerance"]
    cfg = baseline_config(asset).architecture_dict()
    drifted = {k: (v, cfg.get(k, "missing")) for k, v in asset["config"].items() if cfg.get(k, "missing") != v}
    assert not drifted, f"LoopMoEConfig no longer reads the asset's config as recorded (asset, now): {drifted}"
    curve, ref = bf16_run["loss"], baseline["loss"]
    assert len(curve) == len(ref)
    assert bf16_run["all_grads_finite"], f"non-finite gradients at steps {bf16_run['grads_finite']}"
    gaps = relative_gaps(curve, ref)
    where = f"on {name} (baseline: {baseline['source']}, torch {baseline['torch']}; now torch {torch.__version__})"
    assert gaps[0] <= tol["rtol_first_step"], (
        f"first-step loss {curve[0]:.6f} against {ref[0]:.6f} {where}: relative gap {gaps[0]:.2e} > "
        f"{tol['rtol_first_step']:g} (initialisation or forward changed)"
    )
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[worst] <= tol["rtol"], (
        f"bf16 loss curve left its baseline {where}: step {worst} {curve[worst]:.4f} against {ref[worst]:.4f} "
        f"(relative gap {gaps[worst]:.2e} > {tol['rtol']:g}).\n  now:      {[round(x, 4) for x in curve]}\n"
        f"  baseline: {[round(x, 4) for x in ref]}\nIf the change is intended, re-record with `{RECORD_HINT}`."
    )


def test_bf16_autocast_training_tracks_fp32(asset, bf16_run, device):
    """The same initial weights and batch in fp32: the bf16 curve stays within the asset's tolerance
    of it (1.9e-2 at worst on the H100) and both memorise the batch."""
    recipe = asset["recipe"]
    cfg = baseline_config(asset)
    model = build_model(cfg, recipe["seed"], device)
    batch = random_ids(cfg.vocab_size, (recipe["batch"], recipe["seq"]), recipe["data_seed"], device)
    fp32 = train_run(model, batch, recipe["steps"], amp=False, lr=recipe["lr"], device=device)
    assert fp32["all_grads_finite"] and bf16_run["all_grads_finite"]
    assert bf16_run["moe_impl"] == fp32["moe_impl"] == "auto (grouped_mm)"
    gaps = relative_gaps(bf16_run["loss"], fp32["loss"])
    assert max(gaps) <= asset["tolerance"]["rtol"], (max(gaps), bf16_run["loss"], fp32["loss"])
    for run in (bf16_run, fp32):
        assert run["loss"][-1] < run["loss"][0] - 2.0, f"the loss did not fall: {run['loss']}"


@pytest.fixture(scope="module")
def bench_model(asset):
    """The asset's model (not trained) and a batch of it."""
    device = torch.device("cuda")
    cfg = baseline_config(asset)
    model = build_model(cfg, asset["recipe"]["seed"], device)
    batch = random_ids(
        cfg.vocab_size, (asset["recipe"]["batch"], asset["recipe"]["seq"]), asset["recipe"]["data_seed"], device
    )
    return model, batch


def fwd_bwd(model, batch, device) -> float:
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(device):
        out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert grads_finite, "non-finite gradients"
    return out.loss.item()


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"])
def test_forward_backward_under_each_sdpa_backend_alone(backend, bench_model, device):
    """On the H100 all four ran alone and their losses agreed to 3e-5 relative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batch = bench_model
    reference = fwd_bwd(model, batch, device)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        loss = fwd_bwd(model, batch, device)
    assert abs(loss - reference) / reference <= 1e-3, (backend, loss, reference)


def test_pure_bf16_model_under_flash_attention(bench_model, device):
    """A model cast to bf16 runs with flash attention alone; logits near fp32's (rel. L2 3.3e-2 on the H100)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batch = bench_model
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=batch, use_cache=False).logits.float()
        m16 = copy.deepcopy(model).to(torch.bfloat16)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            logits = m16(input_ids=batch, use_cache=False).logits
    assert logits.dtype == torch.bfloat16
    errors = compare(logits, ref)
    assert errors["rel_l2"] <= 0.1 and not errors["nonfinite"], errors


def test_padded_attention_mask_under_autocast(bench_model, device):
    """Left padding on one row needs a real mask tensor (flash attention alone refuses one: SDPA then
    takes another kernel). The unpadded row's logits do not change."""
    model, batch = bench_model
    model.eval()
    mask = torch.ones_like(batch)
    mask[0, : batch.shape[1] // 4] = 0
    with torch.no_grad(), autocast(device):
        plain = model(input_ids=batch, use_cache=False).logits.float()
        padded = model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
    assert torch.isfinite(padded[0, batch.shape[1] // 4 :]).all()
    errors = compare(padded[1:], plain[1:])
    assert errors["rel_l2"] <= 5e-2, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_loss_matches_transformers_loss_on_the_gpu(dtype):
    """The fused loss rewrites its logits buffer in place (``log_softmax`` with ``out=`` its input): on CUDA,
    as on the CPU, the loss and gradients equal transformers' loss on materialised logits, one chunk and
    several (a chunk of 64 rows forces eight)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from loopmoe.model.kernels.cross_entropy import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    V, D = 4099, 64
    h = torch.randn(4, 128, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (0.1 * torch.randn(V, D, device="cuda", generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (4, 128), device="cuda", generator=g)
    labels[0, :5] = -100
    ref = ForCausalLMLoss((h @ w.t()).float(), labels, V)
    ref_grads = torch.autograd.grad(ref, (h, w))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-3}
    for chunk_bytes in (None, 64 * 4 * V):
        fused = linear_cross_entropy(h, w, labels, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(fused, ref, **tol)
        for a, b in zip(torch.autograd.grad(fused, (h, w)), ref_grads):
            torch.testing.assert_close(a.float(), b.float(), **tol)
