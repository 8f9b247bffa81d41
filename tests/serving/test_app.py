"""``loopmoe serve`` end to end, through real HTTP clients (httpx and the openai package) against a server
on 127.0.0.1: answers equal ``model.generate``, streams concatenate to the same text, concurrent requests
are batched and each equals its single answer, ``num_loops`` and adaptive depth per request, stop
strings, cancellation, chat through the chat template (also on the Qwen3-MoE export), and bad requests
answered with a 4xx and a message."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.conftest import CONTEXT, NAME, serving

PROMPTS = ["The looped core", "def main():\n    return", "A", "Python is a programming language that"]


@pytest.fixture(scope="module")
def server(looped_dir):
    # A batch window long enough that concurrent requests of one test reliably meet in one batch.
    with serving(looped_dir, batch_window=0.05) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def complete(client, prompt: str, **body) -> dict:
    response = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, **body})
    assert response.status_code == 200, response.text
    return response.json()


def events(response) -> list:
    """The server-sent events of a streamed response: JSON objects, then the string ``[DONE]``."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- answers ---------------------------------------------------------------------------------------


def test_completion_equals_greedy_generate(server, client):
    prompt = PROMPTS[0]
    answer = complete(client, prompt, max_tokens=12, temperature=0)
    ids = server.encode(prompt)
    assert answer["object"] == "text_completion" and answer["model"] == NAME
    assert answer["choices"][0]["text"] == server.greedy(ids, 12)
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(ids) and usage["total_tokens"] == len(ids) + usage["completion_tokens"]


def test_stream_chunks_concatenate_to_the_same_text(server, client):
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert got[-1] == "[DONE]"
    usage = got[-2]["usage"]
    chunks = got[:-2]
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == server.greedy(server.encode(PROMPTS[1]), 16)
    assert len([p for p in pieces if p]) > 2  # token by token, not one piece at the end
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert usage["completion_tokens"] <= 16 and usage["prompt_tokens"] == len(server.encode(PROMPTS[1]))


def test_concurrent_requests_are_batched_and_each_equals_its_single_answer(server, client):
    before = len(server.engine.batch_sizes)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: complete(client, p, max_tokens=8, temperature=0), PROMPTS))
    for prompt, answer in zip(PROMPTS, answers):
        assert answer["choices"][0]["text"] == server.greedy(server.encode(prompt), 8), prompt
    sizes = list(server.engine.batch_sizes)[before:]
    assert sum(sizes) == len(PROMPTS) and max(sizes) > 1, sizes  # fewer batches than requests


def test_sampling_is_seeded_per_request(client):
    body = dict(max_tokens=8, temperature=1.5, top_p=0.95)
    texts = [complete(client, "Seeded", seed=s, **body)["choices"][0]["text"] for s in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]


def test_stop_string_ends_the_text_before_it(server, client):
    full = complete(client, PROMPTS[3], max_tokens=16, temperature=0)["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle of the answer
    cut = full[: full.index(stop)]
    answer = complete(client, PROMPTS[3], max_tokens=16, temperature=0, stop=[stop])
    assert answer["choices"][0]["text"] == cut and answer["choices"][0]["finish_reason"] == "stop"
    body = {"model": NAME, "prompt": PROMPTS[3], "max_tokens": 16, "temperature": 0, "stop": stop, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [e for e in events(r) if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --- depth per request -----------------------------------------------------------------------------


def test_num_loops_per_request_through_the_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    ids = server.encode(PROMPTS[0])
    answer = client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body={"num_loops": 4}
    )
    deeper = server.greedy(ids, 10, num_loops=4)
    assert answer.choices[0].text == deeper != server.greedy(ids, 10)
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]


def test_adaptive_depth_per_request(server, client):
    ids = server.encode(PROMPTS[3])
    spelled = [
        {"exit": "latent:0.5", "max_loops": 4},
        {"exit_criterion": "latent", "exit_threshold": 0.5, "max_loops": 4},
    ]
    expected = server.greedy(ids, 8, exit_criterion="latent", exit_threshold=0.5, min_loops=1, max_loops=4)
    for fields in spelled:
        assert complete(client, PROMPTS[3], max_tokens=8, temperature=0, **fields)["choices"][0]["text"] == expected


def test_num_loops_is_refused_for_a_t1_checkpoint(vanilla_dir):
    with serving(vanilla_dir) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        refused = client.post("/v1/completions", json={"prompt": "x", "num_loops": 3})
        assert refused.status_code == 400
        assert "trained with num_loops=1" in refused.json()["error"]["message"]
        assert refused.json()["error"]["param"] == "num_loops"
        adaptive = client.post("/v1/completions", json={"prompt": "x", "exit": "latent:0.1", "max_loops": 3})
        assert adaptive.status_code == 400 and "trained with num_loops=1" in adaptive.json()["error"]["message"]
        adaptive = client.post("/v1/completions", json={"prompt": "x", "exit": "latent:0.1"})
        assert adaptive.status_code == 400 and "early exit needs a looped model" in adaptive.json()["error"]["message"]
        ids = server.encode("x")
        same = complete(client, "x", max_tokens=4, temperature=0, num_loops=1)  # its own depth: accepted
        assert same["choices"][0]["text"] == server.greedy(ids, 4)


# --- cancellation ----------------------------------------------------------------------------------


def _cancelled(engine) -> list[tuple[int, str, int]]:
    return [entry for entry in engine.finished if entry[1] == "cancelled"]


def test_a_closed_stream_stops_its_generation(server, client):
    budget = CONTEXT - len(server.encode(PROMPTS[0]))
    before = len(_cancelled(server.engine))
    # 16 loops a token: generating the whole budget takes far longer than noticing the client has gone
    body = {"prompt": PROMPTS[0], "max_tokens": budget, "temperature": 0, "stream": True, "num_loops": 16}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # generation is under way: leave after its first piece of text
    wait_for(lambda: len(_cancelled(server.engine)) > before)
    assert _cancelled(server.engine)[-1][2] < budget  # it stopped before its budget
    assert client.get("/health").json()["status"] == "ok"
    text = complete(client, PROMPTS[2], max_tokens=6, temperature=0)["choices"][0]["text"]
    assert text == server.greedy(server.encode(PROMPTS[2]), 6)


def test_a_client_that_gives_up_on_a_plain_request_stops_its_generation(server, client):
    budget = CONTEXT - len(server.encode(PROMPTS[0]))
    before = len(_cancelled(server.engine))
    with pytest.raises(httpx.ReadTimeout):
        body = {"prompt": PROMPTS[0], "max_tokens": budget, "num_loops": 16}  # seconds of work, at least
        client.post("/v1/completions", json=body, timeout=0.5)
    wait_for(lambda: len(_cancelled(server.engine)) > before)
    assert _cancelled(server.engine)[-1][2] < budget
    assert complete(client, "A", max_tokens=2)["usage"]["completion_tokens"] <= 2


# --- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model 'gpt-4' is not served here"),
        ("/v1/completions", {"prompt": "x", "num_loops": 0}, 400, "num_loops=0: must be a positive integer"),
        ("/v1/completions", {"prompt": "x", "num_loops": "4"}, 400, 'num_loops="4": must be a whole number'),
        ("/v1/completions", {"prompt": "x", "num_loops": 99}, 400, "above this server's limit of 16 loops"),
        ("/v1/completions", {"prompt": "x", "exit": "latent"}, 400, "give CRITERION:THRESHOLD"),
        ("/v1/completions", {"prompt": "x", "exit": "speed:0.1"}, 400, "unknown exit criterion 'speed'"),
        ("/v1/completions", {"prompt": "x", "min_loops": 2}, 400, "give exit (CRITERION:THRESHOLD)"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens=-1: must be at least 1"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature=-1.0: must be >= 0"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p=0.0: must be in (0, 1]"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n=2 is not supported by loopmoe serve"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty=0.5 is not supported"),
        ("/v1/completions", {"prompt": "x", "loops": 4}, 400, "unknown field 'loops'"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "give one prompt (a string) per request"),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt: required"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: at most 4"),
        ("/v1/completions", {"prompt": "x", "generation_config": "{"}, 400, "generation_config is not valid JSON"),
        ("/v1/completions", {"prompt": "x", "generation_config": '{"num_beams": 4}'}, 400, "num_beams is not supp"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages: required, a non-empty list"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content: a string"),
        ("/v1/nowhere", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(client, path, body, status, message):
    response = client.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_is_a_400(client):
    response = client.post("/v1/completions", content=b"prompt=x", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]


def test_a_request_larger_than_the_context_is_a_400_naming_the_limit(server, client):
    long = " ".join(["word"] * (CONTEXT + 10))
    response = client.post("/v1/completions", json={"prompt": long, "max_tokens": 1})
    assert response.status_code == 400
    assert f"this model's context is {CONTEXT} tokens" in response.json()["error"]["message"]
    room = CONTEXT - len(server.encode("x"))
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": room + 1})
    assert response.status_code == 400
    assert f"ask for at most {room} tokens" in response.json()["error"]["message"]
    assert complete(client, "x", max_tokens=1)["usage"]["completion_tokens"] <= 1  # the server goes on


# --- chat ------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a loop?"}]


def test_chat_completion_renders_the_chat_template(server, client):
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    answer = client.post("/v1/chat/completions", json=body).json()
    expected = server.greedy(server.chat_ids(MESSAGES), 10)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert answer["usage"]["prompt_tokens"] == len(server.chat_ids(MESSAGES))
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [e for e in events(r) if e != "[DONE]"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_chat_through_the_openai_client_with_num_loops(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"num_loops": 3}
    )
    assert reply.choices[0].message.content == server.greedy(server.chat_ids(MESSAGES), 6, num_loops=3)


def test_chat_without_a_chat_template_is_a_400_naming_the_fix(looped_dir):
    with serving(looped_dir, chat_template=None) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert response.status_code == 400
        assert "--chat-template base" in response.json()["error"]["message"]
        assert complete(client, "x", max_tokens=1)["usage"]["completion_tokens"] <= 1  # completions still work


def test_chat_on_the_qwen3_moe_export(vanilla_dir, tmp_path):
    from loopmoe.convert import export_qwen3_moe

    export = export_qwen3_moe(vanilla_dir, tmp_path / "qwen3")
    with serving(export) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        assert type(server.model).__name__ == "Qwen3MoeForCausalLM"
        body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        answer = client.post("/v1/chat/completions", json=body).json()
        assert answer["choices"][0]["message"]["content"] == server.greedy(server.chat_ids(MESSAGES), 8)
        text = complete(client, PROMPTS[0], max_tokens=8, temperature=0)["choices"][0]["text"]
        assert text == server.greedy(server.encode(PROMPTS[0]), 8)
        refused = client.post("/v1/chat/completions", json={**body, "num_loops": 2})
        assert refused.status_code == 400 and "need a LoopMoE checkpoint" in refused.json()["error"]["message"]


def test_the_readme_client_snippet_runs_as_written(server, capsys):
    """The README's openai-client example, pointed at this server (its address and model name only)."""
    import re

    from tests.test_readme import README

    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "OpenAI(" in block]
    snippet = snippet.replace("http://127.0.0.1:8000/v1", server.url + "/v1").replace('"looped"', repr(NAME))
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["reply"].choices[0].text == server.greedy(server.encode("ROMEO:"), 32, num_loops=4)
    assert capsys.readouterr().out  # the streamed chat reply was printed
