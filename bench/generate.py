"""(4) Greedy generation with a KV cache: new tokens/s at batch 1 and 8, LoopMoE vs transformers.

    python -m bench.generate [--quick]

Same models as ``bench.train_step`` (LoopMoE converted from the transformers weights; logits
checked first, and the greedy continuations checked identical). Prompt 32 random tokens,
128 new tokens (``min_new_tokens`` forces the full length), timed interleaved. LoopMoE also runs
compiled whole (``model.compile()``) with transformers' static KV cache, whose decoding step has
one shape at every length: its first, untimed generation compiles two graphs (prefill, decoding),
and the recompile count is reported.
Writes bench/results/generate.json.
"""

from __future__ import annotations

import copy

import torch
from torch._dynamo.utils import counters

from bench import common
from loopmoe.testing import hf_parity
from loopmoe.text import markdown_table

PROMPT, NEW = 32, 128


def greedy(model, prompt: torch.Tensor, new: int, **cache):
    """The timed unit: greedy generation of exactly ``new`` tokens after ``prompt``, with a KV cache
    (``cache``: e.g. ``cache_implementation="static"``)."""

    def fn():
        with torch.inference_mode():
            return model.generate(
                prompt,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=None,
                **cache,
            )

    return fn


def run(quick: bool = False) -> dict:
    common.setup()
    refs = {impl: hf_parity.qwen_model(impl) for impl in ("grouped_mm", "eager")}
    ours = hf_parity.ours_from_qwen(refs["grouped_mm"])
    diff = {impl: hf_parity.check_logits(ours, ref) for impl, ref in refs.items()}
    compiled = copy.deepcopy(ours).eval()
    compiled.compile()  # the whole model: one graph per prefill / decoding step shape
    models = {"ours": ours, "ours_compiled": compiled, **{f"hf_{k}": v for k, v in refs.items()}}
    for m in models.values():
        m.eval()
    new = 64 if quick else NEW
    cache = {k: {"cache_implementation": "static"} if k == "ours_compiled" else {} for k in models}
    rows, graphs = [], {}
    for batch in (1, 8):
        prompt = torch.randint(2, 8192, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))

        before = counters["stats"]["unique_graphs"]
        outs = {k: greedy(m, prompt, new, **cache[k])() for k, m in models.items()}  # also compiles ours_compiled
        graphs[batch] = counters["stats"]["unique_graphs"] - before
        same = {k: bool(torch.equal(outs["ours"], o)) for k, o in outs.items() if k != "ours"}
        t = common.interleaved(
            {k: greedy(m, prompt, new, **cache[k]) for k, m in models.items()},
            reps=3 if quick else 7,
            tries=5 if quick else 14,
            budget_s=25 if quick else 90,
        )
        for k in models:
            rows.append(
                {
                    "model": k,
                    "batch": batch,
                    "new_tok_s": batch * new / t[k]["median"],
                    "new_tok_s_min": batch * new / t[k]["max"],
                    "new_tok_s_max": batch * new / t[k]["min"],
                    "ms_per_step": t[k]["median"] / new * 1e3,
                    "same_tokens_as_ours": same.get(k, True),
                    "time": t[k],
                    "vs_hf": common.speedup(t, k, "hf_grouped_mm"),
                }
            )
    return {
        "rows": rows,
        "prompt": PROMPT,
        "new_tokens": new,
        "max_abs_diff": diff,
        "quick": quick,
        "compiled_graphs_per_batch": graphs,  # dynamo graphs compiled by each batch size's first generation
    }


def main(argv=None) -> dict:
    res = run(common.quick_flag(__doc__, argv))
    print(
        markdown_table(
            [
                "model",
                "batch",
                "new tok/s median [min-max]",
                "ms/step",
                "vs HF grouped_mm (paired) [min-max]",
                "same tokens",
            ],
            [
                [
                    r["model"],
                    r["batch"],
                    f"{r['new_tok_s']:.0f} [{r['new_tok_s_min']:.0f}-{r['new_tok_s_max']:.0f}]",
                    f"{r['ms_per_step']:.2f}",
                    common.fmt_speedup(r["vs_hf"]),
                    r["same_tokens_as_ours"],
                ]
                for r in res["rows"]
            ],
        )
    )
    print(
        f"compiled: dynamo graphs per batch size {res['compiled_graphs_per_batch']} (static cache: prefill + decoding)"
    )
    common.write_json("generate", res)
    return res


if __name__ == "__main__":
    main()
