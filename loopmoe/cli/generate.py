"""``loopmoe generate MODEL --prompt TEXT``: text from a checkpoint, with its own tokenizer.

Prompts come from ``--prompt`` (repeatable) or, without it, from standard input: each non-empty
line is one prompt (``loopmoe generate MODEL < prompts.txt``); ``--prompt -`` reads the whole of
standard input as one prompt (multi-line). Each prompt is generated on its own (no padding), and
its text (prompt + continuation) is printed, followed by a newline.

Decoding is transformers' ``generate``: greedy with ``--temperature 0`` (the default), so the
output equals ``model.generate(ids, do_sample=False)``; nucleus sampling with ``--temperature T
--top-p P`` (seeded by ``--seed``). ``--stream`` prints the tokens as they are generated
(transformers' ``TextStreamer``); the text is the same as without it.

``--batch-slots B`` decodes the prompts B at a time with continuous depth batching
(``loopmoe.model.depth_batching``): with ``--exit``, each sequence's token runs its own number of
core iterations in a shared core forward, and a finished sequence's slot goes to the next prompt.
Greedy texts are those of the prompt-by-prompt run (up to float rounding at near-ties); the compute
the exits saved is printed on stderr.

``--compile`` compiles the whole model (``model.compile()``) and decodes with transformers' static KV
cache, whose decoding step has one shape at every length: the first generation compiles two graphs
(prefill, decoding) and the cache's growth recompiles nothing (``bench/generate.py``). The static
cache has the trained depth's layer slots and fixed shapes, so adaptive depth (``--exit``,
``--batch-slots``) and a deeper ``--num-loops`` are refused with it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from loopmoe.errors import CheckpointError, ConfigError, DataError
from loopmoe.model.adaptive import ExitPolicy
from loopmoe.options import add_options, option, options_from
from loopmoe.trust import read_json


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
    exit: str | None = option(
        None,
        help="adaptive depth: each token stops looping once CRITERION falls below THRESHOLD "
        "(latent, cosine, kl, entropy; e.g. latent:0.03), skipping the rest of its core iterations",
        metavar="CRITERION:THRESHOLD",
    )
    min_loops: int = option(1, help="with --exit: iterations every token runs before it may exit")
    max_loops: int | None = option(
        None, help="with --exit: iterations at most (may exceed the trained num_loops)", shown="--num-loops"
    )
    batch_slots: int | None = option(
        None,
        help="decode the prompts this many at a time with continuous depth batching: with --exit, each "
        "sequence's token runs its own number of core iterations in one shared core forward, and a finished "
        "sequence's slot takes the next prompt",
        shown="one prompt at a time",
    )
    truncate: bool = option(
        False,
        help="keep the last tokens of a prompt too long for the context (prompt + --max-new-tokens) "
        "instead of refusing it",
    )
    compile: bool = option(
        False,
        help="compile the whole model (torch.compile) and decode with a static KV cache, the same text; the first "
        "generation compiles (tens of seconds on a CPU), so it pays only for long generations or many prompts; "
        "not with --exit, --batch-slots or --num-loops above the trained one",
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
            raise ConfigError("no prompt: pass --prompt TEXT, or pipe prompts on stdin (one per line)")
        prompts = [line.rstrip("\r\n") for line in _text_lines(stdin) if line.strip()]
        if not prompts:
            raise ConfigError("stdin holds no prompt (every line is empty): pass --prompt TEXT")
        return [_check_text(p, "stdin") for p in prompts]
    return [
        _check_text("".join(_text_lines(stdin)), "stdin") if p == "-" else _check_text(p, "--prompt") for p in given
    ]


def _check_text(prompt: str, where: str) -> str:
    """``prompt`` if it is text; bytes that are not UTF-8 (Python decodes stdin and arguments with
    surrogateescape under a C or POSIX locale, so they arrive as lone surrogates) are a one-line error."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where} is not UTF-8 text (a byte that is not UTF-8 at character {e.start}): "
            + ("pipe a text file, or pass --prompt TEXT" if where == "stdin" else "give the prompt as UTF-8 text")
        ) from None
    return prompt


def _text_lines(stdin) -> list[str]:
    try:
        return list(stdin)
    except UnicodeDecodeError as e:
        raise DataError(
            f"stdin is not UTF-8 text ({e.reason} at byte {e.start}): pipe a text file, or pass --prompt TEXT"
        ) from None


def check_options(opts: GenerateOptions) -> None:
    if opts.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {opts.max_new_tokens}: must be >= 1")
    if not math.isfinite(opts.temperature) or opts.temperature < 0:
        raise ConfigError(f"--temperature {opts.temperature}: must be >= 0 and finite (0 decodes greedily)")
    if not 0 <= opts.seed < 2**63:
        raise ConfigError(f"--seed {opts.seed}: must be a whole number from 0 to 2**63 - 1")
    if not 0.0 < opts.top_p <= 1.0:
        raise ConfigError(f"--top-p {opts.top_p}: must be in (0, 1]")
    if opts.top_k is not None and opts.top_k < 1:
        raise ConfigError(f"--top-k {opts.top_k}: must be >= 1")
    if opts.batch_slots is not None and opts.batch_slots < 1:
        raise ConfigError(f"--batch-slots {opts.batch_slots}: must be >= 1")
    if opts.batch_slots is not None and opts.stream:
        raise ConfigError(
            "--stream prints one sequence as it grows: drop it with --batch-slots (texts print at the end)"
        )
    if opts.compile:
        check_compile(opts)


def check_compile(opts: GenerateOptions) -> None:
    """``--compile`` decodes with a static KV cache: fixed shapes and the trained depth's layer slots
    (``LoopMoEModel.forward`` refuses a deeper run on it), checked before the weights load."""
    for flag, given in (("--exit", opts.exit), ("--batch-slots", opts.batch_slots)):
        if given is not None:
            raise ConfigError(
                f"{flag} decodes at adaptive depth, whose shapes change per token and which the static KV cache "
                f"of --compile cannot hold: drop --compile or {flag}"
            )
    config = opts.model_dir / "config.json"
    if opts.num_loops is None or not config.is_file():  # a missing config.json: load_model names the fix
        return
    trained = read_json(config, CheckpointError, "copy or export the checkpoint again").get("num_loops")
    if isinstance(trained, int) and opts.num_loops > trained:
        raise ConfigError(
            f"--num-loops {opts.num_loops} runs deeper than the trained num_loops={trained}, for which the static "
            f"KV cache of --compile is sized: use --num-loops {trained} or less, or drop --compile for test-time depth"
        )


def check_device(device: str) -> None:
    """A device torch knows and this machine has, or a one-line error naming the fix."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: this torch has no usable Apple GPU (mps); use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device}: loopmoe runs models on cpu, cuda or cuda:N (or mps on a Mac)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")
    if (
        kind == "cuda"
        and torch.device(device).index is not None
        and torch.device(device).index >= torch.cuda.device_count()
    ):
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def fit_context(ids, context: int, max_new_tokens: int, truncate: bool):
    """``ids`` [1, n] if the prompt and ``max_new_tokens`` fit the model's context; else its last tokens that
    do (``truncate``) or a one-line refusal: attention past the context is quadratic and untrained."""
    room = context - max_new_tokens
    if ids.shape[1] <= room:
        return ids
    if room < 1:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context of {context} "
            f"tokens: use at most {context - 1}"
        )
    if not truncate:
        raise ConfigError(
            f"the prompt has {ids.shape[1]} tokens but the model's context is {context} (with {max_new_tokens} new "
            f"tokens, a prompt of at most {room}): shorten it, or pass --truncate to keep its last {room} tokens"
        )
    return ids[:, -room:]


def exit_policy(opts: GenerateOptions) -> ExitPolicy | None:
    """The adaptive depth of ``--exit``, ``--min-loops`` and ``--max-loops`` (None: full depth)."""
    if opts.exit is not None:
        return ExitPolicy.parse(opts.exit, min_loops=opts.min_loops, max_loops=opts.max_loops or opts.num_loops)
    if opts.min_loops != 1 or opts.max_loops is not None:
        raise ConfigError("--min-loops and --max-loops bound an adaptive depth: give --exit CRITERION:THRESHOLD too")
    return None


def generation_kwargs(opts: GenerateOptions, tokenizer) -> dict:
    """Keyword arguments of ``model.generate`` for ``opts``: greedy at temperature 0, else sampling."""
    kwargs: dict = {"max_new_tokens": opts.max_new_tokens}
    policy = exit_policy(opts)
    if policy is not None:
        kwargs.update(
            exit_criterion=policy.criterion,
            exit_threshold=policy.threshold,
            min_loops=policy.min_loops,
            max_loops=policy.max_loops,
        )
    if opts.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or 0)
    if opts.compile:  # one decoding shape at every length: the compiled step never recompiles as the cache grows
        kwargs["cache_implementation"] = "static"
    if tokenizer.eos_token_id is not None:  # stop at the tokenizer's EOS; pad with it (one prompt: no padding)
        kwargs.update(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
    return kwargs


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from loopmoe.evaluation.loading import (  # lazy: the evaluation package loads lm-eval, seconds at every CLI start
        load_hf_tokenizer,
        load_model,
        test_time_depth,
    )

    opts: GenerateOptions = options_from(GenerateOptions, args)
    check_options(opts)
    check_device(opts.device)
    prompts = read_prompts(opts.prompt, sys.stdin)
    model = load_model(opts.model_dir, device=opts.device)
    tokenizer = load_hf_tokenizer(opts.model_dir, opts.tokenizer)
    if opts.compile:
        model.compile()  # the whole model, compiled at its first call: one graph for prefill, one for decoding
        print(
            "loopmoe generate: compiling the model (the first generation takes tens of seconds on a CPU)",
            file=sys.stderr,
            flush=True,
        )
    kwargs = generation_kwargs(opts, tokenizer)
    torch.manual_seed(opts.seed)

    def encode(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(opts.device)
        if ids.shape[1] == 0:
            raise ConfigError(f"prompt {prompt!r} is empty after tokenization: give some text")
        return fit_context(ids, model.config.max_position_embeddings, opts.max_new_tokens, opts.truncate)  # [1, n]

    with test_time_depth(model, opts.num_loops):
        if opts.batch_slots is not None:
            return _generate_depth_batched(model, tokenizer, [encode(p) for p in prompts], opts)
        for prompt in prompts:
            ids = encode(prompt)
            streamer = TextStreamer(tokenizer, skip_special_tokens=True) if opts.stream else None
            out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
            if streamer is None:
                print(tokenizer.decode(out[0], skip_special_tokens=True), flush=True)
    return 0


def _generate_depth_batched(model, tokenizer, encoded: list, opts: GenerateOptions) -> int:
    """``--batch-slots``: every prompt through one ``DepthBatchingDecoder``; texts in prompt order on
    stdout, the compute the exits saved on stderr."""
    from loopmoe.model.depth_batching import (  # lazy: torch and the model load only once a command runs
        DepthBatchingDecoder,
        greedy,
        sampler,
    )

    decoder = DepthBatchingDecoder(model, exit_policy(opts), batch_slots=opts.batch_slots or 1)
    sample = greedy if opts.temperature == 0 else sampler(opts.temperature, opts.top_p, opts.top_k)
    out = decoder.generate([ids[0] for ids in encoded], opts.max_new_tokens, tokenizer.eos_token_id, sample)
    for sequence in out.sequences:
        print(tokenizer.decode(sequence, skip_special_tokens=True), flush=True)
    print(out.stats.summary(), file=sys.stderr)
    return 0
