"""Request bodies read without a server: OpenAI's fields, loopmoe's depth fields, transformers serve's
``generation_config`` (what ``transformers chat`` sends), and which requests may share a batch."""

import json

import pytest

from loopmoe.model.adaptive import ExitPolicy
from loopmoe.serving.requests import Decoding, RequestError, read_chat, read_completion


def test_defaults_follow_openai():
    request = read_completion({"model": "m", "prompt": "x"})
    assert request.max_tokens is None and request.stop == () and not request.stream
    assert request.decoding == Decoding(temperature=1.0, top_p=1.0)  # OpenAI samples at temperature 1


def test_neutral_values_of_unimplemented_fields_and_nulls_are_accepted():
    body = {"prompt": "x", "n": 1, "echo": False, "presence_penalty": 0, "logprobs": None, "user": "u", "seed": None}
    assert read_completion(body).prompt == "x"
    with pytest.raises(RequestError, match="logprobs=true is not supported"):
        read_completion({"prompt": "x", "logprobs": True})


def test_generation_config_is_read_as_transformers_chat_sends_it():
    config = {"do_sample": False, "max_new_tokens": 7, "num_loops": 3, "transformers_version": "5.23.0"}
    request = read_chat({"messages": [{"role": "user", "content": "hi"}], "generation_config": json.dumps(config)})
    assert request.max_tokens == 7 and request.decoding.greedy and request.decoding.num_loops == 3
    body = {"prompt": "x", "max_tokens": 2, "generation_config": json.dumps({"max_new_tokens": 9, "top_k": 5})}
    request = read_completion(body)
    assert request.max_tokens == 2 and request.decoding.top_k == 5  # the body's own fields win


def test_chat_content_parts_and_max_completion_tokens():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = read_chat({"messages": [{"role": "user", "content": parts}], "max_completion_tokens": 3})
    assert request.messages == [{"role": "user", "content": "ab"}] and request.max_tokens == 3
    with pytest.raises(RequestError, match="only text parts"):
        read_chat({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})


def test_exit_spellings_agree():
    spec = read_completion({"prompt": "x", "exit": "cosine:0.1", "min_loops": 2}).decoding.exit
    fields = read_completion({"prompt": "x", "exit_criterion": "cosine", "exit_threshold": 0.1, "min_loops": 2})
    assert spec == fields.decoding.exit == ExitPolicy("cosine", 0.1, 2, None)


def test_which_requests_share_a_batch():
    greedy = Decoding(temperature=0, num_loops=2)
    assert greedy.batch_key() == Decoding(temperature=0, top_p=0.5, num_loops=2).batch_key()  # top_p unused
    assert greedy.batch_key() != Decoding(temperature=0, num_loops=3).batch_key()
    assert Decoding(temperature=0.8).batch_key() != Decoding(temperature=0.9).batch_key()
    assert Decoding(temperature=0.8, seed=1).batch_key() is None  # its seed alone decides its tokens
    assert Decoding(temperature=0, exit=ExitPolicy("latent", 0.1)).batch_key() is None
    assert Decoding(temperature=0, seed=1).batch_key() == Decoding(temperature=0).batch_key()  # greedy ignores it
