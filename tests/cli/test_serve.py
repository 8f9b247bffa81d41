"""``loopmoe serve``: the start banner (timestamped: what is served, its size and depth, where), its options'
errors, and the real command in a process of its own, talked to by ``transformers chat``."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from loopmoe.cli.main import main
from tests.serving.conftest import looped_dir, tokenizer  # noqa: F401  (fixtures)

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


@pytest.fixture(scope="module")
def checkpoint(request):
    """tests/serving's looped tiny LoopMoE (T = 2), saved with its byte-level BPE."""
    return request.getfixturevalue("looped_dir")


@pytest.fixture
def served(monkeypatch):
    """``uvicorn.run`` replaced by a recorder: the command's app and where it would listen."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    yield calls
    for name in ("loopmoe.serve", "uvicorn", "uvicorn.access"):  # the command's handlers wrote to capsys' stderr
        logging.getLogger(name).handlers.clear()


def test_banner_says_what_is_served_and_where(checkpoint, served, capsys):
    argv = ["serve", str(checkpoint), "--port", "8123", "--model-name", "tiny", "--max-batch-size", "4"]
    assert main([*argv, "--max-num-loops", "8", "--chat-template", "base"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "loopmoe serve:" in line]
    assert lines and all(re.match(STAMP, line) for line in lines), err
    banner = "\n".join(lines)
    assert f"{checkpoint} as 'tiny': LoopMoEForCausalLM" in banner and "M parameters" in banner
    assert "trained num_loops=2, a request may ask up to 8" in banner and "batches of up to 4" in banner
    assert "listening on http://127.0.0.1:8123/v1" in banner
    app, kwargs = served[0]
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 8123)
    assert {route.path for route in app.routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch-size", "0"], "--max-batch-size 0: must be >= 1"),
        (["--port", "70000"], "--port 70000: must be 0..65535"),
        (["--max-num-loops", "0"], "--max-num-loops 0: must be >= 1"),
        (["--batch-window", "-1"], "--batch-window -1.0: must be 0..10 seconds"),
        (["--chat-template", "missing.jinja"], "--chat-template missing.jinja: no such file"),
    ],
)
def test_bad_options_are_one_line_errors(checkpoint, served, flags, message, capsys):
    assert main(["serve", str(checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not served


def test_a_folder_that_is_no_checkpoint_is_one_line(tmp_path, served, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "is not a model directory" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_command_serves_and_transformers_chat_talks_to_it(checkpoint, request, tmp_path):
    """The real ``loopmoe serve`` process, and transformers' own chat client against it (``num_loops`` passed
    as transformers chat passes generation settings); Ctrl-C stops the server cleanly."""
    port = _free_port()
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "loopmoe", "serve", str(checkpoint), "--port", str(port), "--model-name", "tiny"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # huggingface_hub's client refuses every URL, even 127.0.0.1, under HF_HUB_OFFLINE
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        # transformers chat drops a flag GenerationConfig has no field for (num_loops=4 alone is ignored);
        # a generation config file adds the field, and then it is sent with every message.
        (tmp_path / "loops.json").write_text('{"num_loops": 4}')
        chat = subprocess.run(
            [
                "transformers",
                "chat",
                "tiny",
                url + "/v1",
                "--generation-config",
                str(tmp_path / "loops.json"),
                "max_new_tokens=6",
                "do_sample=False",
            ],
            input="Hello there\nn\n!exit\n",  # a message; "n": do not continue past the token limit; quit
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert chat.returncode == 0, chat.stdout + chat.stderr
        # The reply streamed in (its text is random bytes of a random model, which rich renders as Markdown)
        # and ended at its token limit, which transformers chat read from the last chunk.
        assert "<tiny>:" in chat.stdout and "Generation stopped after reaching the token limit" in chat.stdout
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(60)
    text = (tmp_path / "serve.log").read_text()
    assert code == 0, text
    assert re.search(STAMP + "loopmoe serve: listening on", text) and "Shutting down" in text
    # transformers chat's message went through the chat template, with its generation settings
    bpe = request.getfixturevalue("tokenizer")
    hello = [{"role": "user", "content": "Hello there"}]
    rendered = bpe.apply_chat_template(hello, add_generation_prompt=True, tokenize=False)
    prompt = len(bpe(rendered, add_special_tokens=False).input_ids)
    assert re.search(STAMP + rf"request \d+: {prompt} prompt \+ 6 new tokens, num_loops=4, length", text), text
