"""Serving a checkpoint over HTTP: OpenAI's completions and chat API, with per-request depth.

``loopmoe serve MODEL`` (``loopmoe.cli.serve``) puts the pieces together:

- ``requests``: a request body read and checked (prompt or messages, budget, stop strings, decoding,
  ``num_loops`` and the adaptive-depth settings), each refusal a ``RequestError`` naming the fix;
- ``engine``: the model's worker thread, which batches waiting requests into one ``generate`` and
  streams each row's text, ending a row at EOS, a stop string, its budget or its client's departure;
- ``app``: the FastAPI application (OpenAI's endpoints, server-sent events, error bodies).

``app`` needs FastAPI (the ``serve`` extra), so it is not imported here: ``requests`` and ``engine``
need only what loopmoe needs (``from loopmoe.serving.app import create_app`` for the rest).
"""

from loopmoe.serving.engine import Engine, Job
from loopmoe.serving.requests import Decoding, Request, RequestError, read_chat, read_completion

__all__ = ["Decoding", "Engine", "Job", "Request", "RequestError", "read_chat", "read_completion"]
