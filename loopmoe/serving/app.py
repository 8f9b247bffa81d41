"""The HTTP side of ``loopmoe serve``: OpenAI's endpoints on FastAPI, in front of an ``Engine``.

- ``POST /v1/completions`` and ``POST /v1/chat/completions``: a JSON answer, or with ``stream: true``
  server-sent events (``data: {chunk}`` ... ``data: [DONE]``), as OpenAI's API defines them;
- ``GET /v1/models``: the one model served (with its context and loop counts);
- ``GET /health``: ``{"status": "ok"}``, plus the jobs waiting and running;
- ``POST /load_model``: what ``transformers chat`` asks before its first message (an SSE ``ready``).

A refused request is a 4xx with OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``.
A client that disconnects cancels its job: a stream's generator is cancelled by the server when its
connection closes, and a plain request's handler watches its connection while it waits. The worker
then ends that row at its next decoding step (``Engine.step``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from loopmoe.serving.engine import Delta, Done, Engine, Event, Failed
from loopmoe.serving.requests import Request as GenerationRequest
from loopmoe.serving.requests import RequestError, read_chat, read_completion

DISCONNECT_POLL_S = 0.25  # how often a waiting plain request checks that its client is still there


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine``; its lifespan starts and stops the engine's worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="loopmoe serve", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": engine.queued, "running": engine.running}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": engine.name, "object": "model", "created": created, "owned_by": "loopmoe"}
        entry["context_length"] = engine.context
        if engine.looped:
            entry.update(num_loops=engine.model.config.num_loops, max_num_loops=engine.max_num_loops)
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await _answer(engine, http, read_completion(await _body(http)))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await _answer(engine, http, read_chat(await _body(http)))

    @app.post("/load_model")
    async def load_model(http: Request) -> StreamingResponse:
        # `transformers chat` asks its server to load the model first and reads SSE progress events.
        body = await _body(http)
        model = body.get("model") if isinstance(body, dict) else None
        if model not in (None, engine.name):
            event = {"status": "error", "model": model, "message": f"this server serves {engine.name!r} only"}
        else:
            event = {"status": "ready", "model": engine.name, "cached": True}
        return StreamingResponse(iter([f"data: {json.dumps(event)}\n\n"]), media_type="text/event-stream")

    return app


async def _body(http: Request) -> Any:
    try:
        return json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not JSON ({e})") from None


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "model_not_found" if param == "model" else "not_found"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


async def _answer(engine: Engine, http: Request, request: GenerationRequest):
    """Submit ``request`` and answer it: a stream of chunks, or one JSON body once the job has ended."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called from the worker thread
        # RuntimeError: the event loop has closed (the server is stopping), so nobody is listening
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = engine.prepare(request, emit)
    engine.submit(job)
    chunk = _Chunks(request, engine.name)
    if request.stream:
        return StreamingResponse(_stream(job, events, chunk, request.include_usage), media_type="text/event-stream")
    text = []
    checked = time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            event = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:  # text keeps coming: check between pieces too
            checked = time.monotonic()
            if await http.is_disconnected():
                job.cancel()
                return _error(499, "the client closed the request", None)
        if event is None:
            continue
        if isinstance(event, Delta):
            text.append(event.text)
        elif isinstance(event, Failed):
            return _error(500, event.message, None)
        else:
            return JSONResponse(chunk.whole("".join(text), event))


async def _stream(job, events: asyncio.Queue[Event], chunk: _Chunks, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a job; when the client goes away the server cancels this generator, and
    ``finally`` cancels the job."""
    try:
        if chunk.kind == "chat":  # OpenAI's first chat chunk carries the role
            yield _sse(chunk.piece({"role": "assistant", "content": ""}, None))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _sse(chunk.piece(event.text, None))
            elif isinstance(event, Failed):
                yield _sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
                return
            else:
                yield _sse(chunk.piece("" if chunk.kind == "completion" else {}, event.finish_reason))
                if include_usage:
                    yield _sse({**chunk.piece(None, None), "choices": [], "usage": _usage(event)})
                yield "data: [DONE]\n\n"
                return
    finally:
        if job.finish_reason is None:
            job.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


class _Chunks:
    """The JSON objects of one answer, in OpenAI's shapes for completions and chat."""

    def __init__(self, request: GenerationRequest, model: str):
        self.kind = request.kind
        self.id = ("cmpl-" if self.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.model = model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def piece(self, content: Any, finish_reason: str | None) -> dict[str, Any]:
        """A streamed chunk: ``content`` is text (completions) or a delta object / text (chat)."""
        if self.kind == "completion":
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("text_completion"), "choices": [choice]}
        delta = content if isinstance(content, dict) or content is None else {"content": content}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def whole(self, text: str, done: Done) -> dict[str, Any]:
        """The answer of a request without ``stream``."""
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None}
            head = self._head("text_completion")
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            head = self._head("chat.completion")
        choice["finish_reason"] = done.finish_reason
        return {**head, "choices": [choice], "usage": _usage(done)}
