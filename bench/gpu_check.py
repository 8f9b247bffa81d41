"""One-shot GPU bench of LoopMoE: the speed of every CUDA path, in one run under a hard time limit.

    PYTHONPATH=. python3 -m bench.gpu_check --out $OUT/gpu_check.json      # on a CUDA machine
    PYTHONPATH=. python3 bench/gpu_check.py --out $OUT/gpu_check.json      # the same
    PYTHONPATH=. python -m bench.gpu_check --device cpu --quick --out /tmp/gpu_check_cpu.json  # smoke run
    PYTHONPATH=. python -m bench.gpu_check --record-baseline  # the bf16 loss curve of tests/gpu, for this GPU

Correctness of the same paths (grouped_mm against the loop path, bf16 against fp32 and against the
recorded bf16 loss curve, the SDPA backends, cached generation, torch.compile against eager) is the
``cuda`` test suite, ``python -m pytest tests/gpu``; both take their cases from ``bench/gpu_cases.py``.

Made for one run under a hard wall-clock limit: every check runs in its own try/except with a time
budget (SIGALRM), the JSON is rewritten after every check and sub-case (a timeout keeps what was
measured), progress lines are flushed as they happen, and the whole run stops starting work once
``--budget`` seconds have passed since the process started (imports included).

Checks (``--checks`` picks a subset, by name):

- ``env``: python / torch / CUDA / transformers versions, the device, whether ``torch._grouped_mm``
  exists, TF32 and SDPA backend flags, whether ``loopmoe`` imports.
- ``peak``: peak dense matmul throughput (bf16 ``n^3``, n = 8192 on CUDA): the MFU denominator.
- ``moe``: one ``SparseMoE`` layer, fwd+bwd time of ``moe_implementation`` ``grouped_mm`` and
  ``loop`` on the same weights and inputs, in bf16, fp32 and fp32 weights under bf16 autocast.
- ``throughput``: training step (fwd + bwd + AdamW, bf16 autocast) tokens/s, MFU and peak memory of
  a ~0.64B-total-parameter Vanilla MoE (``paper-3b`` shapes, 4 layers) and its balanced T = 2
  LoopMoE (``loopmoe.balance``, its default strategy), batch 8 x 2048, ``grouped_mm`` vs ``loop``,
  eager and compiled; plus the Vanilla one with the unfused cross-entropy (``skip_logits=False``)
  and with bf16 parameters (no autocast; ``grouped_mm`` and ``loop``). Warm-up 3, then 10 steps
  timed with CUDA events (fewer when the first step shows they would not fit). MFU = 3 x
  ``compute_budget(cfg, seq).flops_per_token`` x tokens/s / measured peak. Each variant also records
  ``loopmoe plan``'s prediction of it (``planner``: the device's planner profile, e.g. ``h100``; on a
  CPU the cached calibration) and its error; the summary states issue 27's targets (compiled Vanilla
  >= 40% MFU, compiled LoopMoE within 5% of it).
- ``generation``: greedy decoding tokens/s at batch 1 and 8 (fp32 and bf16 weights), and against
  transformers' Qwen3-MoE with the same weights.
- ``compile``: ``torch.compile(model)`` on an eval forward without grad: compile time, eager vs
  compiled time, dynamo graph-break reasons.

``--quick`` shrinks every size so that ``--device cpu --quick`` runs end to end in well under a
minute (on one thread, so that a busy shared CPU does not stall it); CUDA-only parts are then
recorded as skipped with the reason, and throughput times the loop path only. At the end a compact summary
is printed as markdown table rows, ready to paste into PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import gpu_cases
from bench.gpu_cases import build_model as _build_model
from bench.gpu_cases import moe_impl_in_use, moe_inputs, moe_pass, param_count, random_ids, set_moe_impl


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except Exception:
        return 0.0


T0 = time.monotonic() - _process_age()

# Seconds each check may run (SIGALRM). The run as a whole stops at --budget.
CHECK_BUDGETS = {
    "env": 30,
    "peak": 15,
    "moe": 35,
    "throughput": 200,
    "generation": 45,
    "compile": 60,
}
CHECK_ORDER = list(CHECK_BUDGETS)
QUICK_MODEL = {"num_core_layers": 2}  # --quick: the debug preset with a 2-layer core (x T = 2)
RESERVE_S = 4.0  # kept back from the global budget for the summary and the last JSON write
MIN_CHECK_S = 3.0  # a check with less time than this left is skipped


class CheckTimeout(BaseException):
    """Raised by SIGALRM when a check runs past its budget (a BaseException, so that the
    ``except Exception`` of a sub-case does not swallow it)."""


def _on_alarm(signum, frame):
    raise CheckTimeout("check ran past its time budget")


def error_record(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tb[-6:])
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": text[-3000:]}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.item()) if obj.numel() == 1 else f"tensor{list(obj.shape)} {obj.dtype}"
    return str(obj)


class Run:
    """Shared state: arguments, device, the result document and its writer, the clock."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.peak_tflops: float | None = None
        self.check_deadline = math.inf
        self.data = {
            "meta": {
                "script": "bench/gpu_check.py",
                "argv": sys.argv[1:],
                "started_unix": time.time() - self.elapsed(),
                "quick": args.quick,
                "device_arg": args.device,
                "budget_s": args.budget,
                "check_budgets_s": CHECK_BUDGETS,
            },
            "checks": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def remaining(self) -> float:
        return self.args.budget - self.elapsed()

    def check_left(self) -> float:
        """Seconds left to the running check (its own budget or the global one, whichever ends first)."""
        return min(self.check_deadline - time.monotonic(), self.remaining() - RESERVE_S)

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 2)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(_jsonable(self.data), indent=1))
            os.replace(tmp, self.out)
        except Exception as exc:  # never let the writer end the run
            print(f"could not write {self.out}: {exc}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sub(self, res: dict, key: str, fn, *args, **kwargs) -> dict:
        """Run one sub-case ``fn(out, *args)`` filling ``out = res[key]``; record its error, keep going."""
        out = res.setdefault(key, {})
        t = time.monotonic()
        try:
            fn(out, *args, **kwargs)
            self.sync()
        except Exception as exc:
            out["error"] = error_record(exc)
            self.log(f"  {key}: ERROR {type(exc).__name__}: {str(exc)[:300]}")
        out["seconds"] = round(time.monotonic() - t, 3)
        self.save()
        return out

    def run_check(self, name: str, fn) -> None:
        rec = {"status": "pending", "budget_s": CHECK_BUDGETS[name], "result": {}}
        self.data["checks"][name] = rec
        allowed = min(CHECK_BUDGETS[name] * self.args.budget_scale, self.remaining() - RESERVE_S)
        if allowed < MIN_CHECK_S:
            reason = f"global budget exhausted ({self.elapsed():.0f}s of {self.args.budget:.0f}s)"
            if self.remaining() - RESERVE_S >= MIN_CHECK_S:
                reason = f"its budget ({allowed:.1f}s) is under {MIN_CHECK_S}s"
            rec.update(status="skipped", reason=reason)
            self.log(f"check {name}: skipped ({rec['reason']})")
            self.save()
            return
        rec["status"], rec["allowed_s"] = "running", round(allowed, 1)
        self.save()
        self.log(f"check {name}: start (budget {allowed:.0f}s)")
        start = time.monotonic()
        self.check_deadline = start + allowed
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, allowed)
        try:
            fn(self, rec["result"])
            self.sync()  # surface asynchronous CUDA errors inside this check
            rec["status"] = "ok"
        except BaseException as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if isinstance(exc, KeyboardInterrupt):
                raise
            if isinstance(exc, CheckTimeout):
                rec["status"] = "timeout"
            else:
                rec["status"] = "error"
                rec["error"] = error_record(exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.check_deadline = math.inf
            rec["seconds"] = round(time.monotonic() - start, 2)
            self.cleanup()
            self.save()
        msg = f"check {name}: {rec['status']} in {rec['seconds']:.1f}s"
        if "error" in rec:
            msg += f" ({rec['error']['type']}: {rec['error']['message'][:300]})"
        self.log(msg)

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()

    def autocast(self, enabled: bool = True):
        return gpu_cases.autocast(self.device, enabled)


# ------------------------------------------------------------------------------------------------
# helpers


def time_ms(run: Run, fn, warmup: int, reps: int) -> list[float]:
    """Per-call wall times in ms (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    run.sync()
    times = []
    for _ in range(reps):
        if run.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def build_model(run: Run, cfg, seed: int):
    """``gpu_cases.build_model`` on the run's device, logging to the run."""
    return _build_model(cfg, seed, run.device, run.log)


# ------------------------------------------------------------------------------------------------
# env


def check_env(run: Run, res: dict) -> None:
    res["python"] = sys.version.split()[0]
    res["platform"] = platform.platform()
    res["torch"] = torch.__version__
    res["torch_cuda"] = torch.version.cuda
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except Exception as exc:  # the rest of the record is still worth having
        res["transformers"] = f"import failed: {type(exc).__name__}: {exc}"
    versions = {}
    for dist in ("safetensors", "numpy", "tokenizers", "triton", "datasets", "lm_eval", "accelerate"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except Exception:
            versions[dist] = None
    res["packages"] = versions
    res["has_grouped_mm"] = hasattr(torch, "_grouped_mm")
    res["cuda_available"] = torch.cuda.is_available()
    res["device"] = str(run.device)
    res["cpu_threads"] = torch.get_num_threads()
    res["cpu_count"] = os.cpu_count()
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        res["device_name"] = props.name
        res["capability"] = list(torch.cuda.get_device_capability(run.device))
        res["total_memory_gib"] = round(props.total_memory / 2**30, 2)
        res["multiprocessors"] = props.multi_processor_count
        with contextlib.suppress(Exception):
            res["cudnn"] = torch.backends.cudnn.version()
        res["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        res["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        sdp = {}
        for flag in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
            fn = getattr(torch.backends.cuda, flag, None)
            sdp[flag] = fn() if fn else None
        res["sdp_flags"] = sdp
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            )
            res["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except Exception as exc:
            res["nvidia_smi"] = f"unavailable: {exc}"
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        res["git_commit"] = git.stdout.strip() or None
    except Exception:
        res["git_commit"] = None
    t = time.monotonic()
    try:
        import loopmoe

        res["loopmoe"] = {"version": loopmoe.__version__, "path": str(Path(loopmoe.__file__).parent)}
    except Exception as exc:
        res["loopmoe"] = {"error": error_record(exc)}
    res["loopmoe_import_s"] = round(time.monotonic() - t, 2)
    run.log(
        f"  torch {res['torch']} (CUDA {res['torch_cuda']}), transformers {res['transformers']}, "
        f"device {res.get('device_name', run.device)} cap {res.get('capability')}, "
        f"_grouped_mm {res['has_grouped_mm']}, loopmoe {res['loopmoe'].get('version', 'IMPORT FAILED')}"
    )


# ------------------------------------------------------------------------------------------------
# peak matmul


def check_peak(run: Run, res: dict) -> None:
    n = run.args.peak_n
    dtype = torch.bfloat16 if run.cuda else torch.float32
    a = torch.randn(n, n, device=run.device, dtype=dtype)
    b = torch.randn(n, n, device=run.device, dtype=dtype)
    c = torch.empty(n, n, device=run.device, dtype=dtype)
    times = time_ms(run, lambda: torch.mm(a, b, out=c), warmup=3, reps=20 if run.cuda else 3)
    flop = 2 * n**3
    res.update(
        n=n,
        dtype=str(dtype),
        ms_median=statistics.median(times),
        ms_best=min(times),
        tflops_best=flop / min(times) / 1e9,
        tflops_median=flop / statistics.median(times) / 1e9,
    )
    run.peak_tflops = res["tflops_best"]
    run.log(f"  peak {dtype} matmul n={n}: {res['tflops_best']:.1f} TFLOP/s best, {res['tflops_median']:.1f} median")


# ------------------------------------------------------------------------------------------------
# MoE layer: grouped_mm vs loop


def moe_case(out: dict, run: Run, spec: tuple, dtype_name: str) -> None:
    """fwd+bwd milliseconds of each MoE path on one layer shape and dtype."""
    d, E, k, f, fs, _tokens = spec
    moe, x, g, ctx = moe_inputs(spec, dtype_name, run.args.seed, run.device)
    out["shape"] = {
        "d": d,
        "E": E,
        "k": k,
        "f": f,
        "shared": fs,
        "tokens": x.shape[0] * x.shape[1],
        "dtype": dtype_name,
    }
    reps = (1, 2) if run.args.quick else (2, 5)
    for impl in ("loop", "grouped_mm"):
        try:
            times = time_ms(run, lambda impl=impl: moe_pass(moe, x, g, impl, ctx), *reps)
            out[f"{impl}_fwd_bwd_ms"] = statistics.median(times)
        except Exception as exc:
            out[f"{impl}_error"] = error_record(exc)
            run.log(f"    {impl} fwd+bwd failed: {type(exc).__name__}: {str(exc)[:200]}")
    run.log(f"    ms loop {out.get('loop_fwd_bwd_ms', 'n/a')}, grouped {out.get('grouped_mm_fwd_bwd_ms', 'n/a')}")


def check_moe(run: Run, res: dict) -> None:
    q = run.args.quick
    n = run.args.moe_tokens
    d, E, k, f = (64, 8, 2, 32) if q else (1024, 64, 8, 256)
    name = f"d{d}-E{E}-k{k}-f{f}"
    for dtype_name in ("bf16", "fp32", "autocast-bf16"):
        key = f"{name}/{dtype_name}"
        run.log(f"  moe {key}")
        run.sub(res, key, moe_case, run, (d, E, k, f, 0, n), dtype_name)


# ------------------------------------------------------------------------------------------------
# training throughput and MFU


def throughput_configs(run: Run):
    from loopmoe.balance import DEFAULT_STRATEGY, balance
    from loopmoe.config import LoopMoEConfig

    a = run.args
    if a.quick:
        shape = dict(
            vocab_size=2048,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
        )
    else:  # paper-3b shapes, fewer layers
        shape = dict(
            vocab_size=50304,
            hidden_size=1536,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=48,
            num_experts_per_tok=6,
            moe_intermediate_size=512,
        )
    ref = LoopMoEConfig(num_core_layers=a.tp_layers, max_position_embeddings=max(4096, a.tp_seq), **shape)
    note = f"balanced by loopmoe.balance ({DEFAULT_STRATEGY})"
    try:
        looped = balance(ref, 2, DEFAULT_STRATEGY, seq_len=a.tp_seq).looped
    except Exception as exc:
        note = f"balance failed ({type(exc).__name__}: {str(exc)[:200]}); reference shapes, core halved"
        looped = LoopMoEConfig(**{**ref.architecture_dict(), "num_core_layers": a.tp_layers // 2, "num_loops": 2})
    return ref, looped, note


def throughput_variant(out: dict, run: Run, model, cfg, impl: str, mode: str) -> None:
    from loopmoe.budget import compute_budget

    a = run.args
    B, S = a.tp_batch, a.tp_seq
    set_moe_impl(model, impl)
    model.train()
    ids = random_ids(cfg.vocab_size, (B, S), a.seed + 4, run.device)
    amp = mode != "bf16-params"
    skip_logits = False if mode == "unfused-ce" else None
    from loopmoe.distributed.parallelize import apply_activation_checkpointing, apply_compile

    ac = "full" if "ac-full" in mode else "selective" if "ac-selective" in mode else "none"
    apply_activation_checkpointing(model, ac, 2)
    if "compile" in mode and not getattr(model, "_compiled_layers", False):  # regional, in place
        apply_compile(model)
        model._compiled_layers = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with run.autocast(amp):
            o = model(input_ids=ids, labels=ids, skip_logits=skip_logits)
        o.loss.backward()
        opt.step()
        losses.append(o.loss.detach())

    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    t = time.perf_counter()
    step()
    run.sync()
    out["first_step_ms"] = (time.perf_counter() - t) * 1e3
    # Fewer steps when the first one says the planned ones would not fit in the check's time (slow path).
    fit = int((run.check_left() - 5) / max(out["first_step_ms"] / 1e3, 1e-3))
    warmup = max(0, min(a.tp_warmup - 1, fit // 4))
    reps = max(1, min(a.tp_steps, fit - warmup))
    if (warmup, reps) != (max(0, a.tp_warmup - 1), a.tp_steps):
        out["steps_reduced_to_fit"] = {"warmup": warmup + 1, "timed": reps}
    times = time_ms(run, step, warmup=warmup, reps=reps)
    loss = losses[-1].item()
    budget = compute_budget(cfg, S)
    ms = statistics.median(times)
    tok_s = B * S / (ms / 1e3)
    train_flops_tok = 3 * budget.flops_per_token
    out.update(
        impl=impl,
        mode=mode,
        batch=B,
        seq=S,
        num_loops=cfg.num_loops,
        total_params=budget.total_params,
        active_params=budget.active_params,
        flops_per_token_fwd=budget.flops_per_token,
        step_ms_median=ms,
        step_ms_min=min(times),
        step_ms_max=max(times),
        steps_timed=len(times),
        tokens_per_s=tok_s,
        model_tflops=train_flops_tok * tok_s / 1e12,
        loss_after=loss,
        loss_finite=math.isfinite(loss),
    )
    if run.peak_tflops:
        out["mfu"] = out["model_tflops"] / run.peak_tflops
        out["peak_tflops_used"] = run.peak_tflops
    if run.cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.sub(out, "planner", planner_prediction, run, cfg, ac, out)  # a failing plan leaves the row measured
    run.log(
        f"    {ms:.1f} ms/step, {tok_s:,.0f} tok/s, MFU {out.get('mfu', float('nan')):.3f}, "
        f"peak mem {out.get('peak_mem_gib', float('nan')):.1f} GiB, first step {out['first_step_ms']:.0f} ms"
    )


def planner_profile(run: Run):
    """The planner's profile of this device (``loopmoe plan --hardware``), or the reason there is none: a
    CUDA part with a planner profile, or on a CPU this machine's cached calibration (never calibrated
    here: that takes a minute of the run)."""
    from loopmoe.errors import ConfigError
    from loopmoe.hardware import spec_for_cuda_name
    from loopmoe.planning.calibration import get_hardware
    from loopmoe.planning.hardware import PROFILES

    if not run.cuda:
        try:
            return get_hardware("cpu", torch.get_num_threads(), calibrate=False), None
        except ConfigError as exc:
            return None, str(exc)
    name = torch.cuda.get_device_name(run.device)
    spec = spec_for_cuda_name(name)
    if spec is None or spec.name not in PROFILES:
        return None, f"no planner profile for {name!r} (profiles: {', '.join(PROFILES)})"
    return get_hardware(spec.name), None


PLANNED_PARTS = ("gemm", "attention", "elementwise", "overhead", "optimizer", "total")  # seconds, ComputePlan


def planner_prediction(rec: dict, run: Run, cfg, ac: str, measured: dict) -> None:
    """``loopmoe plan``'s prediction of the step just measured, into ``rec``: one device, the same batch,
    checkpointing and precision, with the optimizer; tokens/s and peak memory beside the measurement, and
    the relative error of each (positive: the plan is optimistic). Or ``skipped``, with the reason.

    The plan is of an eager bf16 autocast step (fp32 master weights) with the fused loss and the device's
    own expert kernel; every variant computes in bf16, so its error also says what the variant changes
    against that: compiling, bf16 parameters, the unfused loss, the loop expert path on a GPU."""
    from loopmoe.planning import Layout, plan_step

    hw, why = planner_profile(run)
    if hw is None:
        rec["skipped"] = why
        return
    a = run.args
    layout = Layout(
        micro_batch=a.tp_batch,
        seq_len=a.tp_seq,
        activation_checkpointing=ac,
        dtype="bf16",
        update_guard=False,  # the bench's bare AdamW step keeps no roll-back copy
        threads=1 if run.cuda else torch.get_num_threads(),
    )
    plan = plan_step(cfg, layout, hw)
    parts = plan.compute.as_dict()
    rec.update(
        hardware=hw.name,
        layout=layout.as_dict(),
        step_ms=plan.step_time * 1e3,
        tokens_per_s=plan.tokens_per_s,
        mfu=plan.mfu,
        peak_mem_gib=plan.memory.peak / 2**30,
        compute_ms={k: parts[k] * 1e3 for k in PLANNED_PARTS},
        tokens_per_s_error=plan.tokens_per_s / measured["tokens_per_s"] - 1,
    )
    if "peak_mem_gib" in measured:
        rec["peak_mem_error"] = rec["peak_mem_gib"] / measured["peak_mem_gib"] - 1
    run.log(
        f"    planner ({hw.name}): {plan.tokens_per_s:,.0f} tok/s ({rec['tokens_per_s_error']:+.0%} against "
        f"the measurement), peak mem {rec['peak_mem_gib']:.1f} GiB"
    )


def check_throughput(run: Run, res: dict) -> None:
    a = run.args
    if not run.peak_tflops:  # the peak check did not run: a quick measurement here
        run.sub(res, "peak_measured_here", lambda out: check_peak(run, out))
    ref, looped, note = throughput_configs(run)
    res["peak_tflops"] = run.peak_tflops
    res["vanilla_config"] = ref.architecture_dict()
    res["looped_config"] = looped.architecture_dict()
    res["looped_note"] = note
    res["flops_note"] = "training FLOPs/token = 3 x loopmoe.budget forward FLOPs/token; MFU vs measured bf16 peak"
    plan = [  # by priority: the model is rebuilt for the last entry so that T2 runs before the extras
        # issue 27's pair first, eager then compiled (compiling is in place, so it comes last on a model)
        ("vanilla-T1", ref, [("grouped_mm", "autocast"), ("grouped_mm", "compile")]),
        (
            "looped-T2",
            looped,
            [("grouped_mm", "autocast"), ("grouped_mm", "compile"), ("grouped_mm", "compile+ac-full")],
        ),
        ("looped-T2", looped, [("grouped_mm", "ac-full"), ("grouped_mm", "ac-selective")]),
        ("vanilla-T1", ref, [("loop", "autocast")]),
        ("looped-T2", looped, [("loop", "autocast")]),
        ("vanilla-T1", ref, [("grouped_mm", "unfused-ce"), ("grouped_mm", "bf16-params"), ("loop", "bf16-params")]),
    ]
    for label, cfg, variants in plan:
        if run.check_left() < (3 if a.quick else 12):
            res.setdefault("skipped", []).append(f"{label}: out of time")
            continue
        run.log(f"  build {label}")
        try:
            t = time.perf_counter()
            model = build_model(run, cfg, a.seed)
            res[f"{label}_build_s"] = time.perf_counter() - t
            res[f"{label}_params_real"] = param_count(model)
        except Exception as exc:
            res[f"{label}_build_error"] = error_record(exc)
            run.log(f"    build failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if not run.cuda:  # CPU smoke run: grouped_mm and bf16 are slow reference paths there, not worth timing
            variants = list(dict.fromkeys(("loop", mode) for _, mode in variants if mode != "bf16-params"))
        for impl, mode in variants:
            key = f"{label}/{impl}/{mode}"
            if run.check_left() < (2 if a.quick else 8):
                res.setdefault("skipped", []).append(f"{key}: out of time")
                continue
            if mode == "bf16-params":
                model = model.to(torch.bfloat16)
            run.log(f"  {key}: {a.tp_batch}x{a.tp_seq}")
            run.sub(res, key, throughput_variant, run, model, cfg, impl, mode)
            run.cleanup()
        del model
        run.cleanup()


# ------------------------------------------------------------------------------------------------
# generation


def check_generation(run: Run, res: dict) -> None:
    from loopmoe.presets import get_preset

    q = run.args.quick
    preset = "debug" if q else "bench"
    cfg = get_preset(preset, num_loops=2, pad_token_id=0, **QUICK_MODEL if q else {})
    model = build_model(run, cfg, run.args.seed).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    res["config"] = {"preset": preset, "num_loops": 2, "moe_impl": moe_impl_in_use(model, run.device)}
    new = run.args.gen_new_tokens
    prompt_len = 16
    prompt = random_ids(cfg.vocab_size, (2, prompt_len), run.args.seed + 5, run.device)

    def gen(m, ids, n, **kw):
        return m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw)

    run.log(f"  generate {preset} T=2, greedy {new} new tokens")

    def speed(out: dict, dtype: torch.dtype) -> None:
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            gen(m, prompt[:1], 4)  # warm-up
            for batch in (1, 8):
                ids = random_ids(cfg.vocab_size, (batch, prompt_len), run.args.seed + 6, run.device)
                run.sync()
                t = time.perf_counter()
                gen(m, ids, 1)  # prefill + one token: subtracted below
                run.sync()
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                o = gen(m, ids, new)
                run.sync()
                dt = time.perf_counter() - t
                n = o.shape[1] - prompt_len
                rec = {"new_tokens": n, "seconds": dt, "tokens_per_s": batch * n / dt, "prefill_1tok_s": t1}
                if n > 1 and dt > t1:
                    rec["decode_tokens_per_s"] = batch * (n - 1) / (dt - t1)
                out[f"batch{batch}"] = rec
                run.log(
                    f"    {dtype} batch {batch}: {rec['tokens_per_s']:,.1f} tok/s with prefill, "
                    f"{rec.get('decode_tokens_per_s', float('nan')):,.1f} decode only ({n} new)"
                )

    run.sub(res, "speed_fp32", speed, torch.float32)
    if run.cuda or not q:
        run.sub(res, "speed_bf16", speed, torch.bfloat16)
    else:
        res["speed_bf16"] = {"skipped": "CPU --quick: bf16 decoding on CPU is slow and not what this measures"}
    run.sub(res, "vs_transformers", generation_vs_transformers, run)


def generation_vs_transformers(out: dict, run: Run) -> None:
    """Greedy decoding of transformers' Qwen3-MoE and of the same weights converted to LoopMoE (T = 1):
    new tokens/s of each at batch 1 and 8 (decode only: prefill subtracted). That they decode the same
    tokens is ``tests/gpu/test_generation.py``."""
    from loopmoe.testing import hf_parity

    new = run.args.gen_new_tokens
    qwen = hf_parity.qwen_model("grouped_mm" if run.cuda else "eager", seed=run.args.seed)
    ours = hf_parity.ours_from_qwen(qwen)
    models = {"transformers": qwen.to(run.device).eval(), "loopmoe": ours.to(run.device).eval()}
    for m in models.values():
        m.generation_config.pad_token_id = 0
        m.generation_config.eos_token_id = None
    vocab = qwen.config.vocab_size
    for batch in (1, 8):
        run.sub(out, f"batch{batch}", _decode_vs_transformers, run, models, vocab, batch, new)


def _decode_vs_transformers(rec: dict, run: Run, models: dict, vocab: int, batch: int, new: int) -> None:
    """One batch size of ``generation_vs_transformers``."""
    ids = random_ids(vocab, (batch, 16), run.args.seed + 7, run.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False)
    with torch.no_grad():
        for name, m in models.items():
            m.generate(ids, max_new_tokens=4, **kw)  # warm-up
            run.sync()
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=1, **kw)
            run.sync()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=new, **kw)
            run.sync()
            dt = time.perf_counter() - t
            rec[f"{name}_decode_tokens_per_s"] = batch * (new - 1) / max(dt - prefill, 1e-9)
    rec["speedup"] = rec["loopmoe_decode_tokens_per_s"] / rec["transformers_decode_tokens_per_s"]
    run.log(
        f"    vs transformers Qwen3-MoE, batch {batch}: "
        f"decode {rec['loopmoe_decode_tokens_per_s']:,.0f} vs {rec['transformers_decode_tokens_per_s']:,.0f} "
        f"tok/s ({rec['speedup']:.2f}x)"
    )


# ------------------------------------------------------------------------------------------------
# torch.compile time


def check_compile(run: Run, res: dict) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from loopmoe.presets import get_preset

    q = run.args.quick
    preset = "debug" if q else "bench"
    cfg = get_preset(preset, num_loops=2, **QUICK_MODEL if q else {})
    model = build_model(run, cfg, run.args.seed).eval()
    ids = random_ids(cfg.vocab_size, (2, 32) if q else (4, 256), run.args.seed + 7, run.device)
    backend = run.args.compile_backend or ("inductor" if run.cuda else "eager")
    res.update(preset=preset, backend=backend, input_shape=list(ids.shape), moe_impl=moe_impl_in_use(model, run.device))
    res["works"] = "unknown: the first call did not finish (see status)"
    with torch.no_grad():
        eager_ms = time_ms(run, lambda: model(input_ids=ids, use_cache=False), warmup=1, reps=3)
    res["eager_ms"] = statistics.median(eager_ms)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    run.log(f"  torch.compile(backend={backend!r}) first call ...")
    t = time.perf_counter()
    try:
        with torch.no_grad():
            compiled(input_ids=ids, use_cache=False)
        run.sync()
        res["works"] = True
        res["first_call_s"] = time.perf_counter() - t
        with torch.no_grad():
            res["compiled_ms"] = statistics.median(
                time_ms(run, lambda: compiled(input_ids=ids, use_cache=False), warmup=1, reps=3)
            )
        run.log(
            f"    works: first call {res['first_call_s']:.1f}s, "
            f"{res['compiled_ms']:.1f} ms vs eager {res['eager_ms']:.1f} ms"
        )
    except Exception as exc:
        res["works"] = False
        res["first_call_s"] = time.perf_counter() - t
        res["error"] = error_record(exc)
        run.log(f"    FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        breaks = counters.get("graph_break", {})
        res["graph_breaks"] = {str(k)[:300]: v for k, v in sorted(breaks.items(), key=lambda kv: -kv[1])[:15]}
        res["graph_break_total"] = sum(breaks.values())
        with contextlib.suppress(Exception):
            res["unique_graphs"] = counters["stats"]["unique_graphs"]
        run.save()
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# summary


def _fmt(v, spec: str = ".2e") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def compiled_targets(tp: dict) -> list[str]:
    """Issue 27's GPU targets, from the compiled ``grouped_mm`` rows, each stated apart (either row may be
    missing): the Vanilla at >= 40% MFU, the LoopMoE within 5% of its tokens/s."""
    vanilla, looped = tp.get("vanilla-T1/grouped_mm/compile", {}), tp.get("looped-T2/grouped_mm/compile", {})
    if "mfu" in vanilla:
        mfu = f"compiled Vanilla MFU {vanilla['mfu']:.1%} (>= 40%: {'met' if vanilla['mfu'] >= 0.4 else 'not met'})"
    else:
        mfu = "compiled Vanilla MFU: not measured in this run"
    if "tokens_per_s" in vanilla and "tokens_per_s" in looped:
        ratio = looped["tokens_per_s"] / vanilla["tokens_per_s"]
        parity = f"compiled LoopMoE {ratio:.3f}x its tokens/s (>= 0.95x: {'met' if ratio >= 0.95 else 'not met'})"
    else:
        parity = "compiled LoopMoE against the Vanilla: not measured in this run"
    return ["", f"Targets: {mfu}; {parity}"]


def summary_lines(data: dict) -> list[str]:
    checks = data.get("checks", {})
    lines = []
    env = checks.get("env", {}).get("result", {})
    lines.append(
        f"GPU check: {env.get('device_name', env.get('device', '?'))} (cap {env.get('capability')}), "
        f"torch {env.get('torch')} CUDA {env.get('torch_cuda')}, transformers {env.get('transformers')}, "
        f"_grouped_mm {env.get('has_grouped_mm')}, commit {str(env.get('git_commit'))[:10]}"
    )
    lines.append("")
    lines.append("| check | status | seconds |")
    lines.append("|-------|--------|---------|")
    for name, rec in checks.items():
        status = rec.get("status")
        if "error" in rec:
            status += f": {rec['error']['type']}: {rec['error']['message'][:80]}"
        elif "reason" in rec:
            status += f" ({rec['reason']})"
        lines.append(f"| {name} | {status} | {_fmt(rec.get('seconds'), '.1f')} |")

    peak = checks.get("peak", {}).get("result", {})
    if peak:
        lines += [
            "",
            f"Peak {peak.get('dtype')} matmul n={peak.get('n')}: {_fmt(peak.get('tflops_best'), '.3g')} TFLOP/s",
        ]

    moe = checks.get("moe", {}).get("result", {})
    rows = []
    for key, v in moe.items():
        if not isinstance(v, dict) or "shape" not in v:
            continue
        err = v.get("grouped_mm_error") or v.get("loop_error") or v.get("error")
        note = f"{err['type']}: {err['message'][:60]}" if err else ""
        rows.append(
            f"| {key} | {_fmt(v.get('loop_fwd_bwd_ms'), '.2f')} | {_fmt(v.get('grouped_mm_fwd_bwd_ms'), '.2f')} | {note} |"
        )
    if rows:
        lines += [
            "",
            "MoE layer fwd+bwd, grouped_mm vs loop:",
            "| case | loop ms | grouped ms | note |",
            "|------|---------|------------|------|",
            *rows,
        ]

    tp = checks.get("throughput", {}).get("result", {})
    rows = []
    for key, v in tp.items():
        if isinstance(v, dict) and "tokens_per_s" in v:
            plan = v.get("planner", {})
            if "tokens_per_s" in plan:
                predicted = (
                    f"{plan['tokens_per_s']:,.0f} ({plan['tokens_per_s_error']:+.0%}) | {plan['peak_mem_gib']:.1f}"
                )
            elif "error" in plan:
                predicted = f"planner failed: {plan['error']['type']} | -"
            else:
                predicted = f"{plan.get('skipped', '-')[:40]} | -"
            rows.append(
                f"| {key} | {v['total_params'] / 1e6:.4g}M / {v['active_params'] / 1e6:.4g}M | {v['batch']}x{v['seq']} | "
                f"{v['step_ms_median']:.1f} | {v['tokens_per_s']:,.0f} | {_fmt(v.get('mfu'), '.3f')} | "
                f"{_fmt(v.get('peak_mem_gib'), '.1f')} | {predicted} |"
            )
        elif isinstance(v, dict) and "error" in v:
            rows.append(f"| {key} | - | - | - | {v['error']['type']}: {v['error']['message'][:60]} | - | - | - | - |")
    if rows:
        lines += [
            "",
            f"Training step (fwd+bwd+AdamW), peak {_fmt(tp.get('peak_tflops'), '.3g')} TFLOP/s; T2 {tp.get('looped_note')}:",
            "| model / MoE path / mode | total / active params | batch | ms/step | tokens/s | MFU | peak mem GiB "
            "| planner tokens/s (error) | planner peak mem GiB |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
        lines += compiled_targets(tp)

    ge = checks.get("generation", {}).get("result", {})
    if ge:
        lines += ["", "Generation (greedy, prefill included):"]
        lines += [
            "| weights | batch | new tokens | tokens/s (prefill incl.) | decode tokens/s |",
            "|---------|-------|------------|--------------------------|-----------------|",
        ]
        for key in ("speed_fp32", "speed_bf16"):
            for batch in ("batch1", "batch8"):
                s = ge.get(key, {}).get(batch)
                if s:
                    lines.append(
                        f"| {key[6:]} | {batch[5:]} | {s['new_tokens']} | {s['tokens_per_s']:,.1f} | "
                        f"{_fmt(s.get('decode_tokens_per_s'), ',.1f')} |"
                    )

    co = checks.get("compile", {}).get("result", {})
    if co:
        line = f"torch.compile({co.get('backend')}): works {co.get('works')}"
        if co.get("works"):
            line += (
                f", first call {_fmt(co.get('first_call_s'), '.1f')}s, {_fmt(co.get('compiled_ms'), '.1f')} ms vs eager "
                f"{_fmt(co.get('eager_ms'), '.1f')} ms"
            )
        elif "error" in co:
            line += f" ({co['error']['type']}: {co['error']['message'][:150]})"
        line += f"; graph breaks {co.get('graph_break_total')}"
        lines += ["", line]
    return lines


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 420, quick 90)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every per-check budget")
    ap.add_argument("--checks", default=",".join(CHECK_ORDER), help=f"comma list from {CHECK_ORDER}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size of the peak check (8192; quick 512)")
    ap.add_argument("--moe-tokens", type=int, default=None, help="tokens of the MoE layer check (4096; quick 64)")
    ap.add_argument("--tp-batch", type=int, default=None, help="throughput batch (8; quick 1)")
    ap.add_argument("--tp-seq", type=int, default=None, help="throughput sequence length (2048; quick 32)")
    ap.add_argument("--tp-layers", type=int, default=None, help="throughput Vanilla layers (4; quick 2)")
    ap.add_argument("--tp-steps", type=int, default=None, help="timed steps (10; quick 1)")
    ap.add_argument("--tp-warmup", type=int, default=None, help="warm-up steps (3; quick 1)")
    ap.add_argument("--gen-new-tokens", type=int, default=None, help="generated tokens (64; quick 4)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor on CUDA, eager on CPU)")
    ap.add_argument(
        "--record-baseline",
        action="store_true",
        help=f"only record this GPU's bf16 loss curve into {gpu_cases.BASELINE_PATH.relative_to(gpu_cases.ROOT)} "
        "(the baseline of tests/gpu/test_training.py), then stop",
    )
    args = ap.parse_args(argv)
    defaults = {
        "budget": (420.0, 90.0),
        "peak_n": (8192, 512),
        "moe_tokens": (4096, 64),
        "tp_batch": (8, 1),
        "tp_seq": (2048, 32),
        "tp_layers": (4, 2),
        "tp_steps": (10, 1),
        "tp_warmup": (3, 1),
        "gen_new_tokens": (64, 4),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


# Each check runs on any device; CUDA-only parts inside record themselves as skipped.
CHECKS = {
    "env": check_env,
    "peak": check_peak,
    "moe": check_moe,
    "throughput": check_throughput,
    "generation": check_generation,
    "compile": check_compile,
}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.record_baseline:
        return gpu_cases.record_baseline(torch.device(args.device))
    if not args.device.startswith("cuda") and args.quick:
        # A smoke run on a shared CPU: one thread avoids OpenMP spin-waits when other processes hold the cores.
        torch.set_num_threads(1)
    run = Run(args)
    run.log(f"gpu_check: device {args.device}, quick {args.quick}, budget {args.budget:.0f}s, out {args.out}")
    if run.cuda and not torch.cuda.is_available():
        run.log("CUDA requested but not available: every check will record the failure")
    wanted = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        run.data["meta"]["unknown_checks"] = unknown
        run.log(f"unknown checks ignored: {unknown}")
    if "env" not in wanted:
        wanted.insert(0, "env")
    for name in CHECK_ORDER:
        if name not in wanted:
            continue
        try:
            run.run_check(name, CHECKS[name])
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a timeout racing the error handling: record and go on
            run.data["checks"].setdefault(name, {})["status"] = f"aborted: {type(exc).__name__}"
            run.save()
    try:
        lines = summary_lines(run.data)
    except Exception as exc:
        lines = [f"summary failed: {type(exc).__name__}: {exc}"]
        run.data["summary_error"] = error_record(exc)
    run.data["summary_markdown"] = lines
    run.data["meta"]["finished"] = True
    run.save()
    print("\n" + "=" * 100 + "\nSUMMARY (markdown)\n", flush=True)
    print("\n".join(lines), flush=True)
    run.log(f"done; results in {args.out}")
    return run.data


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
