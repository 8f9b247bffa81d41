"""Adaptive depth on a trained looped model: the loss/compute trade-off, and the wall-clock it buys.

    python -m bench.adaptive_depth --model RUN/final [--text FILE] [--quick]

1. Trade-off: held-out loss, mean executed iterations and FLOPs per token for each criterion over a
   threshold sweep (scoring, no cache), beside full depth. The chosen threshold per criterion is the
   largest that keeps the held-out loss within 0.01 of full depth.
2. Speed, interleaved in one process (``bench.common.interleaved``): scoring tokens/s of the held-out
   batches, batch-1 greedy decoding tokens/s (128 new tokens), and lockstep batched decoding at 8 and
   32 sequences, adaptive at the chosen ``latent`` threshold against full depth.

Without ``--model`` it trains one first: ``configs/debug.toml`` at ``model.num_loops=4`` on the shared
tinyshakespeare (or the embedded corpus), 300 steps, into ``bench/results/adaptive_model`` (once).
Writes bench/results/adaptive_depth.json and docs/adaptive_depth.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from bench import common
from loopmoe.budget import adaptive_flops_per_token, compute_budget
from loopmoe.evaluation.loading import load_hf_tokenizer, load_model
from loopmoe.model.adaptive import CRITERIA
from loopmoe.paths import shared_data_dir

THRESHOLDS = {
    "latent": (0.005, 0.01, 0.02, 0.04, 0.08, 0.16),
    "cosine": (1e-5, 1e-4, 5e-4, 2e-3, 1e-2, 4e-2),
    "kl": (1e-4, 1e-3, 5e-3, 2e-2, 0.1),
    "entropy": (0.5, 1.0, 2.0, 3.0, 4.0),
}
LOSS_BUDGET = 0.01  # held-out loss a threshold may cost against full depth


def trained_model(out: Path) -> Path:
    final = out / "final"
    if not (final / "config.json").is_file():
        from loopmoe.training import load_run_config, run_training

        data = shared_data_dir()
        source = "tinyshakespeare" if data is not None and (data / "tinyshakespeare").is_dir() else "embedded"
        cfg = load_run_config(
            common.ROOT / "configs" / "debug.toml",
            ["model.num_loops=4", f"data.source={source}", "train.max_steps=300", "train.eval_batches=0"],
        )
        run_training(cfg, out)
    return final


@torch.no_grad()
def score(model, batches: torch.Tensor, **kwargs) -> tuple[float, float]:
    """Mean next-token loss and mean executed core iterations over ``batches`` [n, B, S]."""
    losses, loops = [], []
    for ids in batches:
        out = model(ids, labels=ids, use_cache=False, **kwargs)
        losses.append(out.lm_loss.item())
        loops.append(out.exit_loops.float().mean().item() if out.exit_loops is not None else model.config.num_loops)
    return sum(losses) / len(losses), sum(loops) / len(loops)


def run(model_dir: Path | None, quick: bool = False) -> dict:
    common.setup()
    model_dir = model_dir or trained_model(common.RESULTS / "adaptive_model")
    model, tokenizer = load_model(model_dir), load_hf_tokenizer(model_dir)
    cfg = model.config
    if cfg.num_loops < 2:
        raise SystemExit(f"{model_dir} runs its core once: adaptive depth needs a looped model")
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
    corpus = text.read_text()[-200_000:] if text.is_file() else "The looped core runs again. " * 4000
    ids = torch.tensor(tokenizer(corpus).input_ids[: (8 if quick else 32) * 128]).view(-1, 4, 128)
    full_loss, _ = score(model, ids)
    seq = ids.shape[-1]
    full = compute_budget(cfg, seq).flops_per_token
    rows = [dict(criterion="full depth", threshold=None, loss=full_loss, loops=float(cfg.num_loops), flops=full)]
    chosen = {}
    for criterion in CRITERIA:
        for threshold in THRESHOLDS[criterion]:
            loss, loops = score(model, ids, exit_criterion=criterion, exit_threshold=threshold)
            flops = adaptive_flops_per_token(cfg, seq, loops, criterion)
            rows.append(dict(criterion=criterion, threshold=threshold, loss=loss, loops=loops, flops=flops))
            if loss - full_loss <= LOSS_BUDGET:
                chosen[criterion] = threshold
    plot(rows, common.DOCS / "adaptive_depth.png", model_dir)
    threshold = chosen.get("latent")
    speed = {}
    if threshold is not None:
        adaptive = dict(exit_criterion="latent", exit_threshold=threshold)
        prompt1 = ids[0, :1, :32]
        new = 32 if quick else 128

        def decode(prompt, **kwargs):
            return lambda: model.generate(
                prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs
            )

        def scoring(**kwargs):
            return lambda: score(model, ids[:2], **kwargs)

        cases = {"score": (scoring(), scoring(**adaptive)), "decode_b1": (decode(prompt1), decode(prompt1, **adaptive))}
        for batch in (8, 32):
            prompt = ids.reshape(-1, 128)[:batch, :32]
            cases[f"decode_b{batch}"] = (decode(prompt), decode(prompt, **adaptive))
        for name, (full_fn, adaptive_fn) in cases.items():
            stats = common.interleaved({"full": full_fn, "adaptive": adaptive_fn}, reps=3 if quick else 5)
            full_s, adaptive_s = stats["full"]["median"], stats["adaptive"]["median"]
            speed[name] = {"full_s": full_s, "adaptive_s": adaptive_s, "speedup": full_s / adaptive_s}
    result = dict(model=str(model_dir), full_loss=full_loss, sweep=rows, chosen=chosen, speed=speed)
    result["machine"] = common.machine()
    common.write_json("adaptive_depth", result)
    return result


def plot(rows: list[dict], path: Path, model_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loopmoe.atomic import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    full = rows[0]
    ax.scatter([full["flops"] / 1e6], [full["loss"]], color="black", zorder=3, label="full depth")
    for criterion in CRITERIA:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a trained looped LoopMoE checkpoint folder")
    parser.add_argument("--quick", action="store_true", help="fewer batches and tokens")
    args = parser.parse_args()
    result = run(args.model, args.quick)
    for row in result["sweep"]:
        line = f"{row['criterion']:>10} {row['threshold']!s:>8} loss {row['loss']:.4f} loops {row['loops']:.2f}"
        print(f"{line} MFLOPs/token {row['flops'] / 1e6:.3f}")
    for name, s in result["speed"].items():
        print(f"{name}: {s['speedup']:.2f}x (full {s['full_s']:.3f} s, adaptive {s['adaptive_s']:.3f} s)")
    assert all(math.isfinite(r["loss"]) for r in result["sweep"])


if __name__ == "__main__":
    main()
