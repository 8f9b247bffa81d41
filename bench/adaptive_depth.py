"""Adaptive depth on a trained looped model: the loss/compute trade-off, and the wall-clock it buys.

    python -m bench.adaptive_depth --model RUN/final [--quick]
    python -m bench.adaptive_depth --smoke          # end to end on a 2-step tiny model; writes nothing

1. Trade-off: held-out loss, mean executed iterations and FLOPs per token for each criterion over a
   threshold sweep (scoring, no cache), beside full depth and test-time depth (every token at T = 1, 2, ...:
   what an exit policy has to beat). The chosen threshold per criterion is the
   one with the fewest FLOPs per token among those within 0.01 of full depth's held-out loss, and the
   timed policy the chosen (criterion, threshold) with the fewest FLOPs of all.
2. Speed, interleaved in one process (``bench.common.interleaved``): scoring tokens/s of the held-out
   batches and batch-1 greedy decoding tokens/s (128 new tokens) against executed core iterations,
   adaptive at the timed policy beside every fixed depth T = 1 .. num_loops; and batched generation of 8 and 32 sequences (32-token prompts,
   128 new tokens each), four ways: transformers' ``generate`` in lockstep at full depth and with the
   exits (a row's exit saves nothing until every row of the batch has exited), and the continuous
   depth batching decoder (``loopmoe.model.depth_batching``) at full depth and with the exits, which
   also reports the core iterations it executed. The headline is continuous depth batching with
   exits against lockstep full-depth ``generate``.

Without ``--model`` it trains one first: ``configs/debug.toml`` at ``model.num_loops=4`` with the learned
exit gate (``model.exit_gate=true``: Ouro's expected loss over every depth, which teaches the model to
read out well at every iteration) on the shared tinyshakespeare (or the embedded corpus), 300 steps,
into ``bench/results/adaptive_model`` (once). ``--plain`` trains it without the gate instead (into
``bench/results/adaptive_model_plain``): the same sweep on a model trained only at full depth.
Writes bench/results/adaptive_depth.json and docs/adaptive_depth.png (``adaptive_depth_plain`` with
``--plain``; nothing with ``--smoke``, whose
two-step model and one-repetition timings only show that every path runs).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench import common
from loopmoe.budget import adaptive_flops_per_token, compute_budget
from loopmoe.data.shards import load_shards
from loopmoe.evaluation.loading import load_hf_tokenizer, load_model
from loopmoe.model.adaptive import ExitPolicy
from loopmoe.model.depth_batching import DepthBatchingDecoder
from loopmoe.paths import shared_data_dir
from loopmoe.testing.tiny_run import TINY_RUN
from loopmoe.trust import read_json

THRESHOLDS = {  # each from never exiting to exiting at the first boundary on the bench's models
    "latent": (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64),
    "cosine": (1e-4, 5e-4, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2, 0.1),
    "kl": (1e-4, 1e-3, 5e-3, 2e-2, 0.1, 0.5),
    "entropy": (0.5, 1.0, 2.0, 3.0, 4.0, 6.0),
    "gate": (0.99, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3),  # cumulative exit probability: a lower threshold exits earlier
}
LOSS_BUDGET = 0.01  # held-out loss a threshold may cost against full depth
BATCHES = (8, 32)  # sequences generated together
# --smoke: the tests' two-step run of a tiny model (loopmoe.testing.tiny_run), looped 4 times: trained in seconds.
SMOKE_RUN = ["model.num_loops=4", *TINY_RUN]


def trained_model(out: Path, overrides: list[str] | None = None, gate: bool = True) -> Path:
    final = out / "final"
    if not (final / "config.json").is_file():
        from loopmoe.training import load_run_config, run_training

        data = shared_data_dir()
        source = "tinyshakespeare" if data is not None and (data / "tinyshakespeare").is_dir() else "embedded"
        default = ["model.num_loops=4", f"data.source={source}", "train.max_steps=300", "train.eval_batches=0"]
        default += ["model.exit_gate=true"] if gate else []
        cfg = load_run_config(common.ROOT / "configs" / "debug.toml", default + (overrides or []))
        run_training(cfg, out)
    if bool(read_json(final / "config.json").get("exit_gate")) != gate:
        raise SystemExit(
            f"{final} was trained {'without' if gate else 'with'} the exit gate: delete {out} to retrain it"
        )
    return final


def heldout_tokens(model_dir: Path, tokenizer, n: int) -> tuple[str, torch.Tensor]:
    """(where they come from, ``n`` token ids): the validation split of the run that trained ``model_dir``
    (``RUN/data/shards``, documents it never trained on) when it is there, else text the model may have
    seen (the end of the shared tinyshakespeare, or a repeated sentence): the sweep's losses are then
    comparable with each other but are not held-out losses."""
    shards = model_dir.parent / "data" / "shards"
    if (shards / "meta.json").is_file():
        val = load_shards(shards).tokens("val")
        if len(val) >= n:
            return f"validation split of {model_dir.parent}", torch.from_numpy(val[:n].astype("int64"))
    data = shared_data_dir()
    text = data / "tinyshakespeare" / "input.txt" if data is not None else None
    if text is not None and text.is_file():
        where, corpus = f"the last 200k characters of {text} (not held out)", text.read_text()[-200_000:]
    else:
        where, corpus = "a repeated sentence (not held out)", "The looped core runs again. " * 4000
    return where, torch.tensor(tokenizer(corpus).input_ids[:n])


@torch.no_grad()
def score(model, batches: torch.Tensor, **kwargs) -> tuple[float, float]:
    """Mean next-token loss and mean executed core iterations over ``batches`` [n, B, S]."""
    losses, loops = [], []
    for ids in batches:
        out = model(ids, labels=ids, use_cache=False, **kwargs)
        losses.append(out.lm_loss.item())
        loops.append(out.exit_loops.float().mean().item() if out.exit_loops is not None else model.config.num_loops)
    return sum(losses) / len(losses), sum(loops) / len(loops)


def run(model_dir: Path | None, quick: bool = False, smoke: bool = False, plain: bool = False) -> dict:
    common.setup()
    if smoke:  # a throw-away model
        with tempfile.TemporaryDirectory(prefix="adaptive_smoke_") as scratch:
            return measure(trained_model(Path(scratch), SMOKE_RUN, gate=False), quick, smoke)
    if model_dir is None:
        model_dir = trained_model(
            common.RESULTS / ("adaptive_model_plain" if plain else "adaptive_model"), gate=not plain
        )
    return measure(model_dir, quick, smoke, "adaptive_depth_plain" if plain else "adaptive_depth")


def measure(model_dir: Path, quick: bool, smoke: bool, name: str = "adaptive_depth") -> dict:
    """The sweep and the timings on ``model_dir`` (module docstring)."""
    model, tokenizer = load_model(model_dir), load_hf_tokenizer(model_dir)
    cfg = model.config
    if cfg.num_loops < 2:
        raise SystemExit(f"{model_dir} runs its core once: adaptive depth needs a looped model")
    seq = 64 if smoke else 128
    tokens = 1024 if smoke or quick else 4096  # at least 32 prompts of 32 tokens for the batched generation
    heldout, ids = heldout_tokens(model_dir, tokenizer, tokens)
    ids = ids.view(-1, 4, seq)  # [batches, 4, seq]
    full_loss, _ = score(model, ids)
    full = compute_budget(cfg, seq).flops_per_token
    rows: list[dict[str, Any]] = [
        dict(criterion="full depth", threshold=None, loss=full_loss, loops=float(cfg.num_loops), flops=full)
    ]
    # Test-time depth, every token at the same loop count: what an exit policy has to beat.
    fixed: list[dict[str, Any]] = []
    for k in range(1, cfg.num_loops):
        loss_k = score(model, ids, num_loops=k)[0]
        budget_k = compute_budget(cfg, seq, num_loops=k)
        fixed.append(dict(criterion="fixed depth", threshold=k, loss=loss_k, loops=k, flops=budget_k.flops_per_token))
    chosen: dict[str, dict[str, Any]] = {}
    criteria = [c for c in THRESHOLDS if c != "gate" or getattr(cfg, "exit_gate", False)]
    for criterion in criteria:
        for threshold in THRESHOLDS[criterion]:
            loss, loops = score(model, ids, exit_criterion=criterion, exit_threshold=threshold)
            flops = adaptive_flops_per_token(cfg, seq, loops, criterion)
            row = dict(criterion=criterion, threshold=threshold, loss=loss, loops=loops, flops=flops)
            rows.append(row)
            if loss - full_loss <= LOSS_BUDGET and (criterion not in chosen or flops < chosen[criterion]["flops"]):
                chosen[criterion] = row
    if not smoke:
        plot(rows, fixed, criteria, common.DOCS / f"{name}.png", model_dir)
    # The policy timed: the cheapest within the loss budget (a two-step smoke model keeps none: time one anyway).
    best = min(chosen.values(), key=lambda r: r["flops"], default=None)
    if best is None and smoke:
        best = dict(criterion="latent", threshold=THRESHOLDS["latent"][2])
    policy = ExitPolicy(best["criterion"], best["threshold"]) if best is not None else None
    speed: dict = {}
    batched: dict = {}
    if policy is not None:
        new = 8 if smoke else 32 if quick else 128
        timing = dict(reps=1, tries=1, warmup=0) if smoke else dict(reps=3 if quick else 5)
        speed = decode_speed(model, ids, policy, new, timing)
        prompts = ids.reshape(-1, 32)  # 32-token prompts
        for batch in BATCHES:
            batched[f"b{batch}"] = batched_speed(model, prompts[:batch], policy, new, timing)
    result = dict(model=str(model_dir), full_loss=full_loss, sweep=rows, chosen=chosen, speed=speed, batched=batched)
    result["fixed_depth"] = fixed
    result["heldout"] = heldout
    result["policy"] = {"criterion": policy.criterion, "threshold": policy.threshold} if policy else None
    result["exit_gate"] = bool(getattr(cfg, "exit_gate", False))
    result["machine"] = common.machine()
    if not smoke:
        common.write_json(name, result)
    return result


def decode_speed(model, ids: torch.Tensor, policy: ExitPolicy, new: int, timing: dict) -> dict:
    """Scoring and batch-1 greedy decoding: tokens/s against executed core iterations, adaptive under
    ``policy`` beside every fixed depth T = 1 .. num_loops (full depth), interleaved in one process."""
    adaptive = dict(exit_criterion=policy.criterion, exit_threshold=policy.threshold)
    prompt1 = ids[0, :1, :32]
    loops = model.config.num_loops

    def decode(**kwargs):
        return lambda: model.generate(
            prompt1, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs
        )

    def scoring(**kwargs):
        return lambda: score(model, ids[:2], **kwargs)

    # The adaptive runs' executed iterations per token: scoring's exit_loops; for decoding, the same
    # greedy generation through the depth-batching decoder with one slot, which counts them.
    decoded = DepthBatchingDecoder(model, policy, 1).generate([prompt1[0]], new).stats
    iterations = {
        "score": score(model, ids[:2], **adaptive)[1],
        "decode_b1": decoded.decode_iterations / max(decoded.decoded_tokens, 1),
    }
    speed = {}
    for name, make, tokens in (("score", scoring, ids[:2].numel()), ("decode_b1", decode, new)):
        fns = {"full": make(), "adaptive": make(**adaptive)}
        fns.update({f"T{k}": make(num_loops=k) for k in range(1, loops)})
        stats = common.interleaved(fns, **timing)
        full_s, adaptive_s = stats["full"]["median"], stats["adaptive"]["median"]
        depth = {f"T{k}": float(k) for k in range(1, loops)} | {"full": float(loops), "adaptive": iterations[name]}
        speed[name] = {
            "full_s": full_s,
            "adaptive_s": adaptive_s,
            "speedup": full_s / adaptive_s,
            "by_iterations": [
                {"run": run, "iterations": depth[run], "tokens_per_s": tokens / stats[run]["median"]}
                for run in sorted(fns, key=lambda r: depth[r])
            ],
        }
    return speed


def batched_speed(model, prompts: torch.Tensor, policy: ExitPolicy, new: int, timing: dict) -> dict:
    """Batched greedy generation of ``prompts`` [B, n], ``new`` tokens each (no EOS): lockstep ``generate``
    and continuous depth batching (``DepthBatchingDecoder`` with B slots), each at full depth and with
    ``policy``'s exits. Tokens/s, executed core iterations per token, and speed-ups."""
    batch = prompts.shape[0]
    rows = list(prompts)
    engines = {
        "engine_full": DepthBatchingDecoder(model, None, batch),
        "engine_exit": DepthBatchingDecoder(model, policy, batch),
    }
    runs: dict = {}

    def lockstep(**kwargs):
        return lambda: model.generate(
            prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs
        )

    def depth_batched(name: str):
        def go():
            runs[name] = engines[name].generate(rows, new)

        return go

    fns = {
        "lockstep_full": lockstep(),
        "lockstep_exit": lockstep(exit_criterion=policy.criterion, exit_threshold=policy.threshold),
        "engine_full": depth_batched("engine_full"),
        "engine_exit": depth_batched("engine_exit"),
    }
    stats = common.interleaved(fns, **timing)
    out: dict = {"sequences": batch, "new_tokens": new, "policy": f"{policy.criterion}:{policy.threshold}"}
    for name, s in stats.items():
        out[name] = {
            "median_s": s["median"],
            "min_s": s["min"],
            "max_s": s["max"],
            "tokens_per_s": batch * new / s["median"],
        }
    for name, result in runs.items():
        st = result.stats
        tokens = st.prompt_tokens + st.decoded_tokens
        out[name].update(
            loops_per_token=st.iterations / tokens,  # prompts included
            decode_loops_per_token=st.decode_iterations / max(st.decoded_tokens, 1),
            core_saved=st.saved,
            engine_steps=st.steps,
            mixed_steps=st.mixed_steps,
        )
    out["speedup_exit_vs_lockstep_full"] = common.speedup(stats, "engine_exit", "lockstep_full")
    out["speedup_exit_vs_engine_full"] = common.speedup(stats, "engine_exit", "engine_full")
    out["speedup_lockstep_exit_vs_lockstep_full"] = common.speedup(stats, "lockstep_exit", "lockstep_full")
    same = [torch.equal(a, b) for a, b in zip(runs["engine_exit"].sequences, runs["engine_full"].sequences)]
    out["sequences_unchanged_by_exits"] = sum(same)
    return out


def plot(rows: list[dict], fixed: list[dict], criteria: list[str], path: Path, model_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loopmoe.atomic import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    full = rows[0]
    ax.scatter([full["flops"] / 1e6], [full["loss"]], color="black", zorder=3, label="full depth")
    depth = [*fixed, full]
    ax.plot(
        [r["flops"] / 1e6 for r in depth],
        [r["loss"] for r in depth],
        color="black",
        linestyle="--",
        marker="s",
        label="fixed depth T = 1.." + str(len(depth)),
    )
    for criterion in criteria:
        points = [r for r in rows if r["criterion"] == criterion]
        ax.plot([r["flops"] / 1e6 for r in points], [r["loss"] for r in points], marker="o", label=criterion)
    ax.axhline(full["loss"] + LOSS_BUDGET, color="grey", linestyle=":", label=f"full depth + {LOSS_BUDGET}")
    ax.set_xlabel("forward MFLOPs per token")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"Adaptive depth: loss vs compute ({model_dir.parent.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a trained looped LoopMoE checkpoint folder")
    parser.add_argument("--quick", action="store_true", help="fewer batches and tokens")
    parser.add_argument("--plain", action="store_true", help="without --model: train the model without the exit gate")
    parser.add_argument(
        "--smoke", action="store_true", help="every path once on a 2-step tiny model, in seconds; writes nothing"
    )
    args = parser.parse_args(argv)
    result = run(args.model, args.quick, args.smoke, args.plain)
    print(f"held-out tokens: {result['heldout']}")
    for row in [*result["fixed_depth"], *result["sweep"]]:
        line = f"{row['criterion']:>10} {row['threshold']!s:>8} loss {row['loss']:.4f} loops {row['loops']:.2f}"
        print(f"{line} MFLOPs/token {row['flops'] / 1e6:.3f}")
    if result["policy"] is not None:
        print(f"timed policy (fewest FLOPs within {LOSS_BUDGET} of full depth's loss): {result['policy']}")
    for name, s in result["speed"].items():
        print(f"{name}: {s['speedup']:.2f}x (full {s['full_s']:.3f} s, adaptive {s['adaptive_s']:.3f} s)")
        for r in s["by_iterations"]:
            print(f"  {r['run']:>8}: {r['iterations']:.2f} core iterations/token, {r['tokens_per_s']:8.1f} tokens/s")
    for b in result["batched"].values():
        print(f"batched {b['sequences']} sequences x {b['new_tokens']} new tokens, {b['policy']}:")
        for case in ("lockstep_full", "lockstep_exit", "engine_full", "engine_exit"):
            c = b[case]
            loops = f", {c['loops_per_token']:.2f} core iterations/token" if "loops_per_token" in c else ""
            print(f"  {case:>14}: {c['tokens_per_s']:8.1f} tokens/s ({c['median_s']:.3f} s{loops})")
        print(
            f"  continuous depth batching with exits: {common.fmt_speedup(b['speedup_exit_vs_lockstep_full'])} "
            f"vs lockstep full depth, {common.fmt_speedup(b['speedup_exit_vs_engine_full'])} vs its own full depth"
        )
    assert all(math.isfinite(r["loss"]) for r in result["sweep"])
    if args.smoke:
        assert result["batched"] and all(b["engine_exit"]["loops_per_token"] > 0 for b in result["batched"].values())


if __name__ == "__main__":
    main()
