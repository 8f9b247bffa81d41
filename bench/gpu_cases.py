"""The GPU cases shared by the correctness tests (``tests/gpu/``) and the speed bench (``bench/gpu_check.py``).

One home for what both run: how a model or a lone MoE layer is built on the device, one forward and
backward of the layer, how two results are compared, a few AdamW steps, and the bf16 loss-curve
recipe whose baseline lives in ``tests/assets/bf16_loss_curve.json``. Imports only torch and
``loopmoe`` (the latter inside the functions, so that importing this module stays cheap).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASELINE_PATH = ROOT / "tests" / "assets" / "bf16_loss_curve.json"
RECORD_HINT = "python -m bench.gpu_check --record-baseline"


def compare(a: torch.Tensor, ref: torch.Tensor) -> dict:
    """Errors of ``a`` against ``ref``: max abs, max abs / max |ref|, relative L2, non-finite count."""
    a, ref = a.detach().float(), ref.detach().float()
    if a.shape != ref.shape:
        return {"shape_mismatch": [list(a.shape), list(ref.shape)]}
    diff = a - ref
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    ref_max = ref.abs().max().item() if ref.numel() else 0.0
    norm = torch.linalg.vector_norm(ref).item()
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf),
        "rel_l2": torch.linalg.vector_norm(diff).item() / norm if norm > 0 else 0.0,
        "ref_max_abs": ref_max,
        "nonfinite": int((~torch.isfinite(a)).sum().item()),
    }


def random_ids(vocab: int, shape: tuple[int, ...], seed: int, device) -> torch.Tensor:
    """Token ids from a CPU generator (the same ids on every device), then moved."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g).to(device)


def build_model(cfg, seed: int, device: torch.device, log: Callable[[str], None] = print):
    """A LoopMoEForCausalLM initialised directly on the device (falls back to CPU init + move).

    On CUDA the initial weights come from the CUDA generator: the bf16 baseline depends on this.
    """
    from loopmoe.model import LoopMoEForCausalLM

    torch.manual_seed(seed)
    if device.type == "cuda":
        try:
            with torch.device(device):
                return LoopMoEForCausalLM(cfg)
        except Exception as exc:
            log(f"  on-device init failed ({type(exc).__name__}: {exc}); building on CPU")
    return LoopMoEForCausalLM(cfg).to(device)


def set_moe_impl(model: torch.nn.Module, impl: str) -> None:
    from loopmoe.model.moe import Experts

    for m in model.modules():
        if isinstance(m, Experts):
            m.implementation = impl


def moe_impl_in_use(model: torch.nn.Module, device: torch.device) -> str:
    from loopmoe.model.moe import Experts

    impls = {m.implementation for m in model.modules() if isinstance(m, Experts)}
    impl = impls.pop() if len(impls) == 1 else ",".join(sorted(impls))
    if impl == "auto":
        return "auto (grouped_mm)" if device.type == "cuda" else "auto (loop)"
    return impl


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool = True):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# one MoE layer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "autocast-bf16": torch.float32}

_MOE_CACHE: dict = {}


def make_moe(d: int, E: int, k: int, f: int, fs: int, seed: int):
    """A SparseMoE on CPU in fp32 with random router / expert weights (no model init runs for it)."""
    key = (d, E, k, f, fs, seed)
    if key not in _MOE_CACHE:
        _MOE_CACHE.clear()  # one layer at a time: the cases run shape by shape
        _MOE_CACHE[key] = _new_moe(d, E, k, f, fs, seed)
    return copy.deepcopy(_MOE_CACHE[key])


def _new_moe(d: int, E: int, k: int, f: int, fs: int, seed: int):
    from loopmoe.config import LoopMoEConfig
    from loopmoe.model.moe import SparseMoE

    cfg = LoopMoEConfig(
        hidden_size=d,
        num_experts=E,
        num_experts_per_tok=k,
        moe_intermediate_size=f,
        shared_expert_intermediate_size=fs,
        moe_implementation="loop",
    )
    torch.manual_seed(seed)
    moe = SparseMoE(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(moe.gate.weight, std=d**-0.5)  # router logits ~ N(0, 1) for x ~ N(0, 1)
        torch.nn.init.normal_(moe.experts.gate_up_proj, std=d**-0.5)
        torch.nn.init.normal_(moe.experts.down_proj, std=f**-0.5)
    return moe


def moe_inputs(spec: tuple, dtype_name: str, seed: int, device: torch.device):
    """The layer of ``spec = (d, E, k, f, shared, tokens)`` on the device in the dtype, an input and
    an output gradient, and the autocast context (None outside ``autocast-bf16``)."""
    d, E, k, f, fs, tokens = spec
    dtype = DTYPES[dtype_name]
    moe = make_moe(d, E, k, f, fs, seed).to(device, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    seq = max(1, tokens // 4)
    x = torch.randn(4, seq, d, generator=gen).to(device, dtype)
    g = torch.randn(4, seq, d, generator=gen).to(device)
    ctx = autocast(device) if dtype_name == "autocast-bf16" else None
    return moe, x, g, ctx


def moe_pass(moe, x: torch.Tensor, g: torch.Tensor, impl: str, autocast_ctx=None, grad: bool = True) -> dict:
    """Forward (+ backward of ``sum(y * g)``) with one implementation; returns outputs and gradients."""
    moe.experts.implementation = impl
    moe.zero_grad(set_to_none=True)
    seen = {}

    def hook(mod, inputs, output):
        seen["expert_in_dtype"] = str(inputs[0].dtype)
        seen["expert_out_dtype"] = str(output.dtype)

    handle = moe.experts.register_forward_hook(hook)
    try:
        xi = x.detach().clone().requires_grad_(grad)
        with autocast_ctx or contextlib.nullcontext(), torch.set_grad_enabled(grad):
            y, router = moe(xi)
        out = {"y": y.detach(), "topk": router.experts, **seen, "y_dtype": str(y.dtype)}
        if grad:
            (y.float() * g).sum().backward()
            out.update(
                x=xi.grad,
                gate_up=moe.experts.gate_up_proj.grad,
                down=moe.experts.down_proj.grad,
                router=moe.gate.weight.grad,
            )
            if moe.shared_experts is not None:
                out["shared_down"] = moe.shared_experts.down_proj.weight.grad
    finally:
        handle.remove()
    return out


def compare_passes(a: dict, ref: dict) -> dict:
    """``compare`` of every output and gradient two ``moe_pass`` results share, and whether they routed alike."""
    out = {"routing_equal": bool(torch.equal(a["topk"].cpu(), ref["topk"].cpu()))}
    for key in ("y", "x", "router", "gate_up", "down", "shared_down"):
        if a.get(key) is not None and ref.get(key) is not None:
            out[key] = compare(a[key].cpu(), ref[key].cpu())
        elif key in ref or key in a:
            out[key] = {"missing": f"first: {a.get(key) is not None}, second: {ref.get(key) is not None}"}
    return out


# ------------------------------------------------------------------------------------------------
# a few AdamW steps


def train_run(model, batch: torch.Tensor, steps: int, amp: bool, lr: float, device: torch.device) -> dict:
    """``steps`` AdamW steps (no weight decay) on one fixed batch: per-step losses, gradient norms,
    finiteness and wall time."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    out: dict = dict(loss=[], lm_loss=[], aux_loss=[], grad_norm=[], grads_finite=[], step_ms=[])
    out["moe_impl"] = moe_impl_in_use(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            o = model(input_ids=batch, labels=batch)
        o.loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(gr).all() for gr in grads]).all().item())
        gn = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        sync(device)
        out["step_ms"].append((time.perf_counter() - t) * 1e3)
        out["loss"].append(o.loss.item())
        out["lm_loss"].append(o.lm_loss.item())
        out["aux_loss"].append(o.aux_loss.item() if o.aux_loss is not None else None)
        out["grad_norm"].append(gn.item())
        out["grads_finite"].append(finite)
        out["params_with_grad"] = len(grads)
        out["params"] = len(params)
    out["all_grads_finite"] = all(out["grads_finite"])
    return out


# ------------------------------------------------------------------------------------------------
# the bf16 loss-curve baseline


def load_baselines(path: Path = BASELINE_PATH) -> dict:
    """The asset: the recipe, the tolerances and one recorded curve per device name."""
    return json.loads(path.read_text())


def baseline_config(asset: dict):
    """The model of the recipe, from the architecture the asset recorded (not from today's preset)."""
    from loopmoe.config import LoopMoEConfig

    return LoopMoEConfig(**asset["config"])


def bf16_loss_curve(asset: dict, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """The asset's recipe run on ``device``: model init on the device from the seed, one fixed batch,
    AdamW, bf16 autocast, the default MoE path. Returns ``train_run``'s record."""
    recipe = asset["recipe"]
    cfg = baseline_config(asset)
    model = build_model(cfg, recipe["seed"], device, log)
    batch = random_ids(cfg.vocab_size, (recipe["batch"], recipe["seq"]), recipe["data_seed"], device)
    return train_run(model, batch, recipe["steps"], amp=True, lr=recipe["lr"], device=device)


def record_baseline(device: torch.device, path: Path = BASELINE_PATH, log: Callable[[str], None] = print) -> dict:
    """Run the recipe on this GPU and store its curve under the GPU's name (other devices are kept)."""
    if device.type != "cuda":
        raise SystemExit("--record-baseline needs a CUDA device: the baseline is a GPU's bf16 curve")
    asset = load_baselines(path)
    name = torch.cuda.get_device_name(device)
    log(f"recording the bf16 loss curve on {name} into {path}")
    run = bf16_loss_curve(asset, device, log)
    if not run["all_grads_finite"]:
        raise SystemExit(f"non-finite gradients in the baseline run on {name}: nothing recorded")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        commit = None
    asset["baselines"][name] = {
        "loss": run["loss"],
        "torch": torch.__version__,
        "capability": list(torch.cuda.get_device_capability(device)),
        "commit": commit or None,
        "source": f"{RECORD_HINT} ({time.strftime('%Y-%m-%d')})",
        "moe_impl": run["moe_impl"],
    }
    path.write_text(json.dumps(asset, indent=1) + "\n")
    log(f"loss {run['loss'][0]:.4f} -> {run['loss'][-1]:.4f} over {len(run['loss'])} steps; written")
    return asset
