"""Tiny checkpoints (with a byte-level BPE trained on the embedded corpus, so no data folder is needed)
and a live ``loopmoe serve`` application on 127.0.0.1, started in a thread by ``serving``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

pytest.importorskip("fastapi", reason="the serve extra (pip install 'loopmoe[serve]') is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (pip install 'loopmoe[serve]') is not installed")

CONTEXT = 256  # max_position_embeddings of the tiny checkpoints
NAME = "tiny"  # the model id the test servers serve


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A 300-token byte-level BPE as loopmoe's training exports it (pad token, base chat template), trained
    in a fraction of a second on a few stdlib docstrings (the embedded corpus takes half a minute to read)."""
    import argparse
    import dataclasses
    import json

    from loopmoe.data.sources import DataSource
    from loopmoe.data.tokenizer import export_tokenizer, train_bpe_tokenizer

    docs = [module.__doc__ or "" for module in (argparse, dataclasses, json)]
    source = DataSource("stdlib-docstrings", lambda: iter(docs), lambda: "stdlib-docstrings")
    bpe = train_bpe_tokenizer(source, 300, tmp_path_factory.mktemp("bpe"), progress=False)
    return export_tokenizer(bpe, CONTEXT)


def save_checkpoint(path: Path, tokenizer, **overrides) -> Path:
    """A randomly initialised tiny LoopMoE (seeded) saved with ``tokenizer`` into ``path``."""
    from loopmoe import LoopMoEConfig, LoopMoEForCausalLM

    torch.manual_seed(0)
    config = LoopMoEConfig(**{**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": CONTEXT, **overrides})
    LoopMoEForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def looped_dir(tmp_path_factory, tokenizer):
    """A looped LoopMoE (T = 2, IterAdaLN): the paper's model, tiny."""
    return save_checkpoint(tmp_path_factory.mktemp("looped"), tokenizer, num_loops=2)


@pytest.fixture(scope="session")
def vanilla_dir(tmp_path_factory, tokenizer):
    """A T = 1 LoopMoE (a Vanilla MoE), exportable to Qwen3-MoE."""
    return save_checkpoint(tmp_path_factory.mktemp("vanilla"), tokenizer, num_loops=1)


@dataclass
class Server:
    """A running server (``url``, its ``engine``) and a separate copy of its model and tokenizer, with
    which a test computes what the server must answer (the worker thread owns the engine's copy)."""

    url: str
    engine: object
    model: object
    tokenizer: object

    def greedy(self, ids: list[int], max_tokens: int, **kwargs) -> str:
        """``model.generate``'s greedy continuation of ``ids``, as text (stopping at EOS)."""
        prompt = torch.tensor([ids])
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
            **kwargs,
        )
        return self.decode(out[0, prompt.shape[1] :].tolist())

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids


@contextmanager
def serving(model_dir: Path, *, chat_template: str | None = "keep", **engine_kwargs) -> Iterator[Server]:
    """``loopmoe serve``'s application for ``model_dir`` on a free port of 127.0.0.1, in a thread."""
    from loopmoe.evaluation.loading import load_hf_tokenizer, load_model
    from loopmoe.serving import Engine
    from loopmoe.serving.app import create_app

    tokenizer = load_hf_tokenizer(model_dir)
    if chat_template != "keep":
        tokenizer.chat_template = chat_template
    engine = Engine(load_model(model_dir), tokenizer, name=NAME, **engine_kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until the server listens on it: no race
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        yield Server(url, engine, load_model(model_dir), load_hf_tokenizer(model_dir))
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
