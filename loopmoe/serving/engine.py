"""The generation engine behind ``loopmoe serve``: a queue of requests and one worker that batches them.

HTTP handlers (``app.py``) turn a request into a ``Job`` (``Engine.prepare``: prompt tokens, budget,
decoding, all checked against the model) and ``submit`` it. One background thread owns the model: it
takes the oldest waiting job, waits ``batch_window`` seconds for others, adds every waiting job that
may share its batch (``Decoding.batch_key``: same greedy/sampling settings and loop count), left-pads
the prompts and runs one ``model.generate`` for them all. Requests that arrive while a batch runs wait
for the next one (static batching, not continuous).

Each row of a batch is followed by a stopping criterion (``_Rows``) that transformers calls after
every decoding step: it appends the row's new token, decodes the row's text, emits what is new (held
back while it may be the start of a stop string or an unfinished UTF-8 character), and ends the row at
EOS, at a stop string, at its own ``max_tokens`` or when its client went away (``Job.cancel``). The
batch ends when every row has. So streaming, stop strings and cancellation need nothing from the
model but ``generate`` itself, and work for any causal LM (a LoopMoE or its Qwen3-MoE export).

**Exactness.** A job alone in its batch runs exactly ``model.generate(ids, attention_mask=ones,
max_new_tokens=max_tokens)``: a greedy answer equals ``loopmoe generate``'s, token for token, and with
``use_cache`` a cached decode equals an uncached one (tests/model). A batch of several rows computes
the same tokens through matrix products of another shape, whose float rounding differs: on a CPU the
logits of a row in a batch differ from its logits alone by about 3e-7 (fp32, measured on the ``debug``
preset, T = 2), so a greedy token can differ only where two logits tie that closely. ``max_batch_size=1``
(``--max-batch-size 1``) makes every answer bit-identical to a single ``generate``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2  # transformers renders chat templates with it, in a sandbox: a template runs no code
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from loopmoe.evaluation.loading import is_looped
from loopmoe.serving.requests import COMPLETION_DEFAULT_MAX_TOKENS, Decoding, Request, RequestError

log = logging.getLogger("loopmoe.serve")

HISTORY = 256  # finished jobs and batch sizes kept for /health and the tests


@dataclass(frozen=True)
class Delta:
    """New text of a job."""

    text: str


@dataclass(frozen=True)
class Done:
    """A job's end: ``finish_reason`` is ``stop`` (EOS or a stop string), ``length`` or ``cancelled``."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The batch a job was in raised: the message of the exception."""

    message: str


Event = Delta | Done | Failed


class Job:
    """One request inside the engine: its prompt tokens in, its events out (``emit``, called from the
    worker thread), and a cancellation flag the worker reads after every decoding step."""

    _ids = itertools.count()

    def __init__(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        stop: tuple[str, ...],
        decoding: Decoding,
        emit: Callable[[Event], None],
    ):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.stop = stop
        self.decoding = decoding
        self.emit = emit
        self.tokens: list[int] = []  # generated, EOS excluded
        self.sent = 0  # characters of the text emitted so far
        self.finish_reason: str | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this job (its client went away); the worker notices at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.emit(Done(reason, len(self.prompt_ids), len(self.tokens)))


class Engine:
    """The model, its tokenizer and the batching worker (see the module docstring).

    ``max_num_loops`` bounds a request's ``num_loops`` / ``max_loops`` (each loop is a pass through the
    core, so an unbounded one would hold the worker for any time); ``batch_window`` is how long the
    worker waits, once a job is there, for others to batch with it.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        max_batch_size: int = 8,
        batch_window: float = 0.01,
        max_num_loops: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.looped = is_looped(model)
        config = model.config
        self.max_num_loops = max_num_loops or (max(config.max_loops, config.num_loops) if self.looped else 1)
        self.context = int(config.max_position_embeddings)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = next(
            (i for i in (tokenizer.pad_token_id, *sorted(self.eos_ids)) if i is not None), 0
        )  # what fills the left of shorter prompts (masked out) and the end of finished rows
        # A Rust tokenizer may refuse use from two threads at once ("Already borrowed"): handlers encode, the worker
        # decodes, one at a time.
        self.tokenizer_lock = threading.Lock()
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.running = 0  # jobs in the batch being generated
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=HISTORY)
        self.finished: collections.deque[tuple[int, str, int]] = collections.deque(maxlen=HISTORY)

    # -- requests -----------------------------------------------------------------------------------------

    def prepare(self, request: Request, emit: Callable[[Event], None]) -> Job:
        """The job for ``request``: its prompt tokenized (chat: through the chat template), its budget
        fitted to the context, its depth settings checked; ``RequestError`` names what to change."""
        if request.model is not None and request.model != self.name:
            raise RequestError(
                f"model {request.model!r} is not served here: this server serves {self.name!r} (GET /v1/models)",
                status=404,
                param="model",
            )
        request.check(self.model.config, looped=self.looped, max_num_loops=self.max_num_loops)
        ids = self.encode(request.prompt) if request.kind == "completion" else self.encode_chat(request.messages or [])
        if not ids:
            raise RequestError("the prompt is empty after tokenization: give some text", param="prompt")
        room = self.context - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but this model's context is {self.context} tokens "
                "(max_position_embeddings), with room for at least one new token: shorten the prompt",
                param="messages" if request.kind == "chat" else "prompt",
            )
        max_tokens = request.max_tokens
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            max_tokens = min(room, COMPLETION_DEFAULT_MAX_TOKENS) if request.kind == "completion" else room
        elif max_tokens > room:
            raise RequestError(
                f"this model's context is {self.context} tokens (max_position_embeddings), but the prompt has "
                f"{len(ids)} tokens and max_tokens is {max_tokens} ({len(ids) + max_tokens} in all): ask for at "
                f"most {room} tokens, or shorten the prompt",
                param="max_tokens",
            )
        return Job(ids, max_tokens, request.stop, request.decoding, emit)

    def encode(self, text: str | None) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text or "", add_special_tokens=True).input_ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokens of ``messages`` rendered by the tokenizer's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                f"the tokenizer of {self.name!r} has no chat template, so messages cannot be made into a prompt: "
                "restart `loopmoe serve` with --chat-template base (loopmoe's plain 'Role: text' transcript) or "
                "--chat-template FILE (a Jinja template), or use /v1/completions",
                param="messages",
            )
        with self.tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except jinja2.TemplateError as e:
                raise RequestError(f"the chat template refused the messages: {e}", param="messages") from None
            # The template writes any BOS itself: the tokenizer must not add a second.
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise RequestError("the server is shutting down", status=503)
            self._pending.append(job)
            self._wake.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- the worker ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="loopmoe-serve-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker after its batch; jobs still waiting end as cancelled."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for job in self._pending:
            job.finish("cancelled")
        self._pending.clear()

    def _work(self) -> None:
        while batch := self._next_batch():
            self.running = len(batch)
            self.batch_sizes.append(len(batch))
            start = time.perf_counter()
            try:
                self._generate(batch)
            except Exception as e:  # a bug or an out-of-memory: this batch fails, the server goes on
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    if job.finish_reason is None:
                        job.finish_reason = "error"
                        job.emit(Failed(f"generation failed ({type(e).__name__}: {e})"))
            finally:
                self.running = 0
            seconds = time.perf_counter() - start
            for job in batch:
                self.finished.append((job.id, job.finish_reason or "error", len(job.tokens)))
                log.info(
                    "request %d: %d prompt + %d new tokens, %s, %s, %.2f s in a batch of %d",
                    job.id,
                    len(job.prompt_ids),
                    len(job.tokens),
                    _depth(job.decoding),
                    job.finish_reason,
                    seconds,
                    len(batch),
                )

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job and those that may share its batch; [] once closed."""
        with self._wake:
            while True:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return []
                if self.batch_window > 0 and len(self._pending) < self.max_batch_size:
                    self._wake.wait(self.batch_window)  # let concurrent requests arrive
                    if self._closed:
                        return []
                first = self._pending.popleft()
                if first.cancelled:  # its client left while it waited
                    first.finish("cancelled")
                    self.finished.append((first.id, "cancelled", 0))
                    continue
                batch, key = [first], first.decoding.batch_key()
                if key is not None:
                    for job in list(self._pending):
                        if len(batch) == self.max_batch_size:
                            break
                        if job.decoding.batch_key() == key and not job.cancelled:
                            batch.append(job)
                            self._pending.remove(job)
                return batch

    def _generate(self, batch: list[Job]) -> None:
        """One ``model.generate`` over the left-padded prompts of ``batch``; ``_Rows`` streams and stops."""
        width = max(len(job.prompt_ids) for job in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [B, width]
        mask = torch.zeros_like(ids)  # [B, width]: 0 on the left padding
        for row, job in enumerate(batch):
            ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids) :] = 1
        decoding = batch[0].decoding
        if decoding.seed is not None and not decoding.greedy:  # such a job is alone in its batch
            torch.manual_seed(decoding.seed)
        kwargs: dict[str, Any] = decoding.generate_kwargs()
        if self.eos_ids:
            kwargs["eos_token_id"] = sorted(self.eos_ids)
        device = self.model.device
        self.model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(job.max_tokens for job in batch),
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([_Rows(self, batch)]),
            **kwargs,
        )
        for job in batch:  # generate stops at the longest budget: every row has ended by then
            if job.finish_reason is None:
                self._flush(job)
                job.finish("length")

    # -- text of a row ------------------------------------------------------------------------------------

    def decode(self, tokens: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, job: Job, token: int) -> None:
        """Append ``token`` to ``job`` and emit the text that is certain; end the job where it ends."""
        if job.cancelled:
            job.finish("cancelled")
            return
        if token in self.eos_ids:
            self._flush(job)
            job.finish("stop")
            return
        job.tokens.append(token)
        text = self.decode(job.tokens)
        # A stop string cannot start in text already sent: its possible starts are held back (below).
        hits = [i for i in (text.find(s, job.sent) for s in job.stop) if i >= 0]
        if hits:  # the text ends before the stop string, which is not returned (OpenAI's rule)
            end = min(hits)
            self._send(job, text[job.sent : end])
            job.finish("stop")
            return
        if len(job.tokens) >= job.max_tokens:
            self._send(job, text[job.sent :])
            job.finish("length")
            return
        safe = len(text.rstrip("\ufffd"))  # U+FFFD at the end: a character whose bytes are still coming
        held = max((n for s in job.stop for n in range(1, len(s)) if text[:safe].endswith(s[:n])), default=0)
        self._send(job, text[job.sent : safe - held])

    def _flush(self, job: Job) -> None:
        """Emit whatever the row held back (a possible stop-string start, an unfinished character)."""
        if job.tokens:
            self._send(job, self.decode(job.tokens)[job.sent :])

    @staticmethod
    def _send(job: Job, piece: str) -> None:
        if piece:
            job.sent += len(piece)
            job.emit(Delta(piece))


class _Rows(StoppingCriteria):
    """transformers' stopping-criterion hook, called after every decoding step: each unfinished row
    takes its new token (``Engine.step``); the rows that have ended are reported done ([B] bool)."""

    def __init__(self, engine: Engine, batch: list[Job]):
        self.engine = engine
        self.batch = batch

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()  # [B]: the token each row got at this step (padding for ended rows)
        for job, token in zip(self.batch, new):
            if job.finish_reason is None:
                self.engine.step(job, token)
        done = [job.finish_reason is not None for job in self.batch]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def _depth(decoding: Decoding) -> str:
    """A request's depth, for the log: ``num_loops=4``, ``trained depth`` or the adaptive policy."""
    if decoding.exit is not None:
        e = decoding.exit
        return f"exit {e.criterion}:{e.threshold:g} ({e.min_loops}..{e.max_loops} loops)"
    return "trained depth" if decoding.num_loops is None else f"num_loops={decoding.num_loops}"


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a reply: the tokenizer's EOS and the checkpoint's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(i for i in configured if isinstance(i, int))
    return ids
