"""``loopmoe serve MODEL``: an OpenAI-compatible HTTP server for a checkpoint, with per-request depth.

``POST /v1/completions`` and ``/v1/chat/completions`` (streamed or not), ``GET /v1/models`` and
``/health``, on FastAPI + uvicorn (``pip install 'loopmoe[serve]'``). Concurrent requests are batched
(``loopmoe.serving.engine``); a request sets the core's depth with ``num_loops`` or an adaptive
``exit`` in its body (OpenAI clients: ``extra_body={"num_loops": 4}``).

Why not ``transformers serve``: it finds a model class as an attribute of the ``transformers`` module
itself (``getattr(transformers, config.architectures[0])``), so no model registered from outside
transformers loads (``AttributeError: module transformers has no attribute LoopMoEForCausalLM``),
with loopmoe installed or through remote code; and it has no per-request loop count.

The checkpoint is loaded as ``loopmoe generate`` loads it: no code from the folder runs.
"""

from __future__ import annotations

import logging
import logging.config
from dataclasses import dataclass
from pathlib import Path

from loopmoe.cli.generate import check_device
from loopmoe.errors import ConfigError, DataError, MissingFileError
from loopmoe.options import add_options, option, options_from

SERVE_EXTRA = "pip install 'loopmoe[serve]'"
BASE_TEMPLATE = "base"  # --chat-template base: loopmoe's own template for base models

LOG_FORMAT = "%(asctime)s %(message)s"
LOG_DATE = "%Y-%m-%d %H:%M:%S"


@dataclass
class ServeOptions:
    """The options of ``loopmoe serve``."""

    model_dir: Path = option(help="checkpoint directory (config.json + weights + tokenizer files)", positional=True)
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, help="TCP port to listen on")
    model_name: str | None = option(
        None, help="the model id clients send and /v1/models lists", shown="MODEL_DIR as given"
    )
    device: str = option("cpu", help="torch device, e.g. cpu or cuda:0")
    tokenizer: Path | None = option(
        None, help="tokenizer.json or tokenizer dir, when MODEL_DIR has no tokenizer saved", shown="MODEL_DIR's"
    )
    chat_template: str | None = option(
        None,
        help="chat template for a tokenizer without one: 'base' (loopmoe's plain 'Role: text' transcript) or a "
        "Jinja template file",
        shown="the tokenizer's",
        metavar="base|FILE",
    )
    max_batch_size: int = option(
        8, help="requests generated together in one batch (1: each answer bit-identical to loopmoe generate's)"
    )
    batch_window: float = option(0.01, help="seconds the worker waits for more requests before starting a batch")
    max_num_loops: int | None = option(
        None, help="the largest num_loops / max_loops a request may ask for", shown="the checkpoint's max_loops"
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, streaming, num_loops)",
        description="Serve MODEL_DIR's model on http://HOST:PORT/v1: POST /v1/completions and /v1/chat/completions "
        "(streamed with stream=true), GET /v1/models and /health. Concurrent requests are batched. A request may "
        "set num_loops, or an adaptive depth (exit='latent:0.03', min_loops, max_loops), in its body. Needs the "
        f"serve extra: {SERVE_EXTRA}.",
    )
    add_options(p, ServeOptions)
    p.set_defaults(run=run)


def check_options(opts: ServeOptions) -> None:
    if not 0 <= opts.port < 65536:
        raise ConfigError(f"--port {opts.port}: must be 0..65535")
    if opts.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size {opts.max_batch_size}: must be >= 1")
    if not 0 <= opts.batch_window <= 10:
        raise ConfigError(f"--batch-window {opts.batch_window}: must be 0..10 seconds")
    if opts.max_num_loops is not None and opts.max_num_loops < 1:
        raise ConfigError(f"--max-num-loops {opts.max_num_loops}: must be >= 1")


def read_chat_template(value: str) -> str:
    """The template ``--chat-template`` names: loopmoe's base one, or a Jinja file's text."""
    from loopmoe.data.tokenizer import BASE_CHAT_TEMPLATE  # lazy: data pulls in tokenizers and the shard store

    if value == BASE_TEMPLATE:
        return BASE_CHAT_TEMPLATE
    path = Path(value)
    if not path.is_file():
        raise MissingFileError(f"--chat-template {value}: no such file; give a Jinja template file, or 'base'")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--chat-template {value}: not UTF-8 text; give a Jinja template file") from None


def log_config() -> dict:
    """uvicorn's logging, and loopmoe's, on stderr with a timestamp on every line."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": LOG_FORMAT, "datefmt": LOG_DATE},
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(asctime)s %(client_addr)s "%(request_line)s" %(status_code)s',
                "datefmt": LOG_DATE,
                "use_colors": False,
            },
        },
        "handlers": {
            "plain": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["plain"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "loopmoe.serve": {"handlers": ["plain"], "level": "INFO", "propagate": False},
        },
    }


def banner(engine, opts: ServeOptions) -> list[str]:
    """The start lines: what is served, its size and depth, the batching, where it listens."""
    model, config = engine.model, engine.model.config
    parameters = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    depth = (
        f"trained num_loops={config.num_loops}, a request may ask up to {engine.max_num_loops}"
        if engine.looped
        else "not a LoopMoE: requests cannot set num_loops"
    )
    chat = (
        "chat template: the tokenizer's"
        if getattr(engine.tokenizer, "chat_template", None)
        else ("no chat template: /v1/chat/completions is refused (restart with --chat-template base)")
    )
    return [
        f"loopmoe serve: {opts.model_dir} as {engine.name!r}: {type(model).__name__}, "
        f"{parameters / 1e6:.2f}M parameters, {dtype}, {opts.device}, context {engine.context} tokens",
        f"loopmoe serve: {depth}; batches of up to {engine.max_batch_size} (window {engine.batch_window * 1e3:g} ms); "
        f"{chat}",
        f"loopmoe serve: listening on http://{opts.host}:{opts.port}/v1 (POST /v1/completions, "
        "/v1/chat/completions; GET /v1/models, /health)",
    ]


def run(args) -> int:
    opts: ServeOptions = options_from(ServeOptions, args)
    check_options(opts)
    check_device(opts.device)
    template = read_chat_template(opts.chat_template) if opts.chat_template is not None else None
    try:
        import uvicorn

        from loopmoe.serving import Engine  # lazy: loads the evaluation package (lm-eval), seconds at CLI start
        from loopmoe.serving.app import create_app  # lazy: FastAPI is an optional extra
    except ImportError as e:
        raise ConfigError(f"loopmoe serve needs FastAPI and uvicorn ({e}): {SERVE_EXTRA}") from None
    from loopmoe.evaluation.loading import (  # lazy: the evaluation package loads lm-eval, seconds at every CLI start
        load_hf_tokenizer,
        load_model,
    )

    logging.config.dictConfig(log_config())
    log = logging.getLogger("loopmoe.serve")
    log.info("loopmoe serve: loading %s", opts.model_dir)
    model = load_model(opts.model_dir, device=opts.device)
    tokenizer = load_hf_tokenizer(opts.model_dir, opts.tokenizer)
    if template is not None:
        if getattr(tokenizer, "chat_template", None):
            log.info("loopmoe serve: --chat-template replaces the tokenizer's own chat template")
        tokenizer.chat_template = template
    engine = Engine(
        model,
        tokenizer,
        name=opts.model_name or str(opts.model_dir),
        max_batch_size=opts.max_batch_size,
        batch_window=opts.batch_window,
        max_num_loops=opts.max_num_loops,
    )
    for line in banner(engine, opts):
        log.info(line)
    uvicorn.run(create_app(engine), host=opts.host, port=opts.port, log_config=log_config())
    return 0
