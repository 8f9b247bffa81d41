"""(4b) Decoding as a user meets it: a saved LoopMoE and its Qwen3-MoE export, both from ``from_pretrained``.

    python -m bench.decode_vs_hf [--threads N] [--rounds R] [--new 64] [--quick]

A LoopMoE of the ``bench`` preset (T = 1, Qwen3-MoE's shape, seeded random weights) is saved with
``save_pretrained``, exported with ``loopmoe.convert.export_qwen3_moe``, and both folders are loaded
the way the README loads a model: ``AutoModelForCausalLM.from_pretrained`` (ours with
``trust_remote_code=True``), eager, default attention and experts kernels. Greedy generation of
``--new`` tokens after a 32-token prompt at batch 1 and 8; the two models' tokens must be identical.

Timing: rounds interleaved in one process (ours, theirs; then theirs, ours), the ratio taken per
round and its median reported. With one thread the clock is the thread's CPU time, which other
processes on the machine do not inflate (they still share the caches and memory bandwidth); with
more, wall time. Before that, a kernel table times ``F.linear`` against the decoding matmul
(``loopmoe.model.kernels.linear.linear``) on every weight shape of the model, weights out of
cache: on a new machine it says at once whether the decoding matmul is the part that does not
transfer. Writes bench/results/decode_vs_hf.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common
from loopmoe.convert import export_qwen3_moe
from loopmoe.model import LoopMoEForCausalLM
from loopmoe.model.kernels.linear import SPLIT_MAX_ROWS, linear
from loopmoe.presets import get_preset
from loopmoe.text import markdown_table

PROMPT = 32
BATCHES = (1, 8)
_COLD_BYTES = 48 << 20  # weights cycled per timing: above a 32 MiB L3, as decoding reads them


def load_pair(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, theirs): the saved LoopMoE and its Qwen3-MoE export, loaded by ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    LoopMoEForCausalLM(get_preset("bench")).save_pretrained(folder / "loopmoe")
    export_qwen3_moe(folder / "loopmoe", folder / "qwen3_moe")
    ours = AutoModelForCausalLM.from_pretrained(folder / "loopmoe", trust_remote_code=True)
    theirs = AutoModelForCausalLM.from_pretrained(folder / "qwen3_moe")
    return ours.eval(), theirs.eval()


def greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def clock(threads: int):
    """The thread's CPU time with one thread (robust to other processes), else the wall clock."""
    return time.thread_time if threads == 1 else time.perf_counter


def paired(fns: dict, rounds: int, threads: int) -> dict:
    """Each callable once per round, the order reversed every other round; per-round times."""
    now = clock(threads)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = now()
            fns[name]()
            times[name].append(now() - t)
    return times


def ratio_stats(ours: list[float], theirs: list[float]) -> dict:
    """theirs / ours per round: how many times faster ours ran."""
    ratios = [b / a for a, b in zip(ours, theirs)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def kernel_table(model, threads: int, rounds: int = 5) -> list[dict]:
    """``F.linear`` against ``linear`` for every distinct weight shape of ``model`` at 1 and
    ``SPLIT_MAX_ROWS`` rows, cycling copies of the weight so that each product reads it from memory."""
    shapes = set()
    for name, p in model.named_parameters():
        if name.endswith("gate_up_proj") or name.endswith("down_proj"):
            shapes.add(tuple(p.shape[1:]))  # one expert's matrix
        elif p.dim() == 2 and "embed" not in name:
            shapes.add(tuple(p.shape))
    rows_out = []
    now = clock(threads)
    for shape in sorted(shapes):
        pool = [torch.randn(shape) for _ in range(max(1, _COLD_BYTES // (4 * shape[0] * shape[1])))]
        for rows in (1, SPLIT_MAX_ROWS):
            x = torch.randn(rows, shape[1])
            t = {"F.linear": [], "linear": []}
            with torch.inference_mode():
                for _ in range(rounds):
                    for name, fn in (("F.linear", F.linear), ("linear", linear)):
                        start = now()
                        for w in pool:
                            fn(x, w)
                        t[name].append((now() - start) / len(pool))
            rows_out.append(
                {
                    "weight": list(shape),
                    "rows": rows,
                    "f_linear_us": statistics.median(t["F.linear"]) * 1e6,
                    "linear_us": statistics.median(t["linear"]) * 1e6,
                    "speedup": ratio_stats(t["linear"], t["F.linear"]),
                }
            )
    return rows_out


def run(threads: int, rounds: int, new: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = load_pair(Path(tmp))
    loaded = {"ours": type(ours).__module__, "theirs": type(theirs).__module__}
    kernels = kernel_table(ours, threads)
    rows = []
    for batch in BATCHES:
        prompt = torch.randint(
            2, ours.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)
        )
        a, b = greedy(ours, prompt, new), greedy(theirs, prompt, new)  # also the warm-up
        if not torch.equal(a, b):
            first = int((a != b).any(0).nonzero()[0]) - PROMPT
            raise AssertionError(f"batch {batch}: ours and transformers' greedy tokens differ from new token {first}")
        runs = {"ours": partial(greedy, ours, prompt, new), "theirs": partial(greedy, theirs, prompt, new)}
        t = paired(runs, rounds, threads)
        rows.append(
            {
                "batch": batch,
                "ours_new_tok_s": batch * new / statistics.median(t["ours"]),
                "theirs_new_tok_s": batch * new / statistics.median(t["theirs"]),
                "speedup": ratio_stats(t["ours"], t["theirs"]),
                "same_tokens": True,
                "times_s": t,
            }
        )
    return {
        "rows": rows,
        "kernels": kernels,
        "prompt": PROMPT,
        "new_tokens": new,
        "threads": threads,
        "clock": "thread CPU time" if threads == 1 else "wall",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loaded_classes": loaded,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per batch size")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 32 new tokens (bench.run_all --quick)")
    args = ap.parse_args(argv)
    res = run(args.threads, 3 if args.quick else args.rounds, 32 if args.quick else args.new)
    print(f"threads {res['threads']} ({res['clock']}), CPU capability {res['cpu_capability']}")
    print(
        markdown_table(
            ["weight", "rows", "F.linear us", "linear us", "linear vs F.linear (paired) [min-max]"],
            [
                [
                    "x".join(map(str, k["weight"])),
                    k["rows"],
                    f"{k['f_linear_us']:.0f}",
                    f"{k['linear_us']:.0f}",
                    common.fmt_speedup(k["speedup"]),
                ]
                for k in res["kernels"]
            ],
        )
    )
    print(
        markdown_table(
            [
                "batch",
                "ours new tok/s",
                "transformers new tok/s",
                "ours vs transformers (paired) [min-max]",
                "same tokens",
            ],
            [
                [
                    r["batch"],
                    f"{r['ours_new_tok_s']:.0f}",
                    f"{r['theirs_new_tok_s']:.0f}",
                    common.fmt_speedup(r["speedup"]),
                    r["same_tokens"],
                ]
                for r in res["rows"]
            ],
        )
    )
    common.write_json("decode_vs_hf", res)
    return res


if __name__ == "__main__":
    main()
