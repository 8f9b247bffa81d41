"""``loopmoe generate MODEL --prompt TEXT``: text from a checkpoint, with its own tokenizer.

Prompts come from ``--prompt`` (repeatable) or, without it, from standard input: each non-empty
line is one prompt (``loopmoe generate MODEL < prompts.txt``); ``--prompt -`` reads the whole of
standard input as one prompt (multi-line). Each prompt is generated on its own (no padding), and
its text (prompt + continuation) is printed, followed by a newline.

Decoding is transformers' ``generate``: greedy with ``--temperature 0`` (the default), so the
output equals ``model.generate(ids, do_sample=False)``; nucleus sampling with ``--temperature T
--top-p P`` (seeded by ``--seed``). ``--stream`` prints the tokens as they are generated
(transformers' ``TextStreamer``); the text is the same as without it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from loopmoe.options import add_options, option, options_from


@dataclass
class GenerateOptions:
    """The options of ``loopmoe generate``."""

    model_dir: Path = option(help="checkpoint directory (config.json + weights + tokenizer files)", positional=True)
    prompt: list[str] = option(
        default_factory=list,
        help="a prompt; repeatable; '-' reads all of stdin as one prompt",
        shown="each non-empty line of stdin is a prompt",
    )
    num_loops: int | None = option(
        None, help="loops of the core at inference (LoopMoE only)", shown="the trained num_loops"
    )
    max_new_tokens: int = option(64, help="tokens to generate per prompt (fewer if the model emits its EOS token)")
    temperature: float = option(0.0, help="sampling temperature; 0 decodes greedily")
    top_p: float = option(
        1.0, help="nucleus sampling: keep the smallest token set with this probability (with --temperature > 0)"
    )
    top_k: int | None = option(None, help="sample among the k most likely tokens (with --temperature > 0)", shown="all")
    seed: int = option(0, help="seed of the sampling")
    stream: bool = option(False, help="print tokens as they are generated")
    device: str = option("cpu", help="torch device, e.g. cpu or cuda:0")
    tokenizer: Path | None = option(
        None, help="tokenizer.json or tokenizer dir, when MODEL_DIR has no tokenizer saved", shown="MODEL_DIR's"
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint (greedy or sampled, optionally streamed)",
        description="Continue each prompt with MODEL_DIR's model and tokenizer, offline. Without --prompt, each "
        "non-empty line of stdin is a prompt; --prompt - reads all of stdin as one prompt. Greedy by default "
        "(identical to transformers' generate with do_sample=False); --temperature/--top-p/--top-k sample.",
    )
    add_options(p, GenerateOptions)
    p.set_defaults(run=run)


def read_prompts(given: list[str], stdin) -> list[str]:
    """The prompts of ``--prompt`` (``-``: all of ``stdin`` as one), or each non-empty line of ``stdin``."""
    if not given:
        if stdin.isatty():
            raise ValueError("no prompt: pass --prompt TEXT, or pipe prompts on stdin (one per line)")
        prompts = [line.rstrip("\r\n") for line in stdin if line.strip()]
        if not prompts:
            raise ValueError("stdin holds no prompt (every line is empty): pass --prompt TEXT")
        return prompts
    return [stdin.read() if p == "-" else p for p in given]


def check_options(opts: GenerateOptions) -> None:
    if opts.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {opts.max_new_tokens}: must be >= 1")
    if opts.temperature < 0:
        raise ValueError(f"--temperature {opts.temperature}: must be >= 0 (0 decodes greedily)")
    if not 0.0 < opts.top_p <= 1.0:
        raise ValueError(f"--top-p {opts.top_p}: must be in (0, 1]")
    if opts.top_k is not None and opts.top_k < 1:
        raise ValueError(f"--top-k {opts.top_k}: must be >= 1")


def generation_kwargs(opts: GenerateOptions, tokenizer) -> dict:
    """Keyword arguments of ``model.generate`` for ``opts``: greedy at temperature 0, else sampling."""
    kwargs: dict = {"max_new_tokens": opts.max_new_tokens}
    if opts.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or 0)
    if tokenizer.eos_token_id is not None:  # stop at the tokenizer's EOS; pad with it (one prompt: no padding)
        kwargs.update(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
    return kwargs


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from loopmoe.evaluation.loading import load_hf_tokenizer, load_model, test_time_depth

    opts: GenerateOptions = options_from(GenerateOptions, args)
    check_options(opts)
    prompts = read_prompts(opts.prompt, sys.stdin)
    model = load_model(opts.model_dir, device=opts.device)
    tokenizer = load_hf_tokenizer(opts.model_dir, opts.tokenizer)
    kwargs = generation_kwargs(opts, tokenizer)
    torch.manual_seed(opts.seed)
    with test_time_depth(model, opts.num_loops):
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(opts.device)
            if ids.shape[1] == 0:
                raise ValueError(f"prompt {prompt!r} is empty after tokenization: give some text")
            streamer = TextStreamer(tokenizer, skip_special_tokens=True) if opts.stream else None
            out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
            if streamer is None:
                print(tokenizer.decode(out[0], skip_special_tokens=True), flush=True)
    return 0
