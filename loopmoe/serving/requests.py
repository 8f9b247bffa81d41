"""The body of an OpenAI ``/v1/completions`` or ``/v1/chat/completions`` request, read and checked.

Every field a request may carry is read here, with its type and range, into a ``Request``: the
prompt (text, or chat messages), the token budget, stop strings, the decoding (greedy or sampled)
and loopmoe's depth settings. What breaks a rule is a ``RequestError`` whose message names the
field and the fix; the server answers it as a 4xx JSON error, never a 500.

A field of the OpenAI API that the server does not implement is refused unless it has its neutral
value (``n: 1``, ``echo: false``, ``presence_penalty: 0``, ...): a client that asks for a penalty
or several choices must not get an answer computed without them. ``null`` is the same as absent.

loopmoe's own fields travel in the body too (OpenAI clients send them with ``extra_body``):

- ``num_loops``: the core's loop count for this request (test-time depth; LoopMoE only);
- ``exit`` (``"CRITERION:THRESHOLD"``, as ``loopmoe generate --exit``) or ``exit_criterion`` and
  ``exit_threshold``, with ``min_loops`` / ``max_loops``: adaptive depth (docs/design.md §5);
- ``top_k``: sample among the k most likely tokens;
- ``generation_config``: a JSON string of transformers ``GenerationConfig`` fields, the extension
  of ``transformers serve`` that ``transformers chat`` sends (its ``max_new_tokens``, ``do_sample``,
  ``temperature``, ... and the loop settings above). Fields of the body itself take precedence.

The checks that need the model (its context, whether it loops) are in ``Request.check``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from loopmoe.errors import ConfigError
from loopmoe.model.adaptive import ExitPolicy

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: what is left of the context)
MAX_STOP_STRINGS = 4  # OpenAI's limit

# OpenAI fields the server does not implement, with the values that leave the answer unchanged.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
}
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")  # bookkeeping: no effect on the text
LOOP_FIELDS = ("num_loops", "exit", "exit_criterion", "exit_threshold", "min_loops", "max_loops")
COMMON_FIELDS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "generation_config",
    *LOOP_FIELDS,
)
COMPLETION_FIELDS = ("prompt", *COMMON_FIELDS)
CHAT_FIELDS = ("messages", "max_completion_tokens", *COMMON_FIELDS)
# `generation_config` (transformers serve's extension): the GenerationConfig fields read, as body fields.
GENERATION_CONFIG_FIELDS = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    **{name: name for name in LOOP_FIELDS if name != "exit"},
}


class RequestError(ConfigError):
    """A request the server refuses: ``status`` is the HTTP status (400, 404), the message names the fix."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen, and how deep the core runs: what the rows of one batch must share."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    num_loops: int | None = None  # None: the checkpoint's own (its generation config, else the trained count)
    exit: ExitPolicy | None = None  # adaptive depth, as given (resolved against the model by Request.check)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple | None:
        """Requests with equal keys may share a batch; None runs alone.

        A seeded sampled request runs alone so that its seed alone decides its tokens; an adaptive-depth
        request runs alone because batched rows decode in lockstep (a row's exits would change which
        code path its neighbours take, and so their rounding).
        """
        if self.exit is not None or (self.seed is not None and not self.greedy):
            return None
        if self.greedy:
            return ("greedy", self.num_loops)
        return ("sample", self.temperature, self.top_p, self.top_k, self.num_loops)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for this decoding (loop settings included)."""
        if self.greedy:
            kwargs: dict[str, Any] = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # top_k=0 turns off transformers' default of 50: OpenAI samples from every token
            kwargs = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        if self.num_loops is not None:
            kwargs["num_loops"] = self.num_loops
        if self.exit is not None:
            kwargs.update(
                exit_criterion=self.exit.criterion,
                exit_threshold=self.exit.threshold,
                min_loops=self.exit.min_loops,
                max_loops=self.exit.max_loops,
            )
        return kwargs


@dataclass
class Request:
    """One completion or chat request, read from its body (``read_completion`` / ``read_chat``)."""

    kind: str  # "completion" or "chat"
    model: str | None
    prompt: str | None = None  # /v1/completions
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions: [{"role": ..., "content": ...}]
    max_tokens: int | None = None  # None: the default of the endpoint
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    decoding: Decoding = field(default_factory=Decoding)

    def check(self, config, *, looped: bool, max_num_loops: int) -> None:
        """The checks that need the model: loop settings on a model that loops, ``num_loops`` within the
        server's limit, an adaptive policy the model can run (``config``: the model's config)."""
        d = self.decoding
        if (d.num_loops is not None or d.exit is not None) and not looped:
            raise RequestError(
                f"num_loops and exit settings need a LoopMoE checkpoint; this model is {config.model_type!r}: "
                "leave them out",
                param="num_loops" if d.num_loops is not None else "exit",
            )
        if d.num_loops is not None:
            self._loops_allowed("num_loops", d.num_loops, config.num_loops, max_num_loops)
            try:
                config.check_num_loops(d.num_loops)
            except ConfigError as e:
                raise RequestError(str(e), param="num_loops") from None
        if d.exit is not None:
            # max_loops defaults to the request's num_loops (as `loopmoe generate`), else the trained count
            max_loops = d.exit.max_loops if d.exit.max_loops is not None else d.num_loops
            try:
                policy = replace(d.exit, max_loops=max_loops).resolved(config)
            except ConfigError as e:
                raise RequestError(f"exit: {e}", param="exit") from None
            assert policy.max_loops is not None  # resolved() fills it in
            self._loops_allowed("max_loops", policy.max_loops, config.num_loops, max_num_loops)
            self.decoding = replace(d, exit=policy)

    @staticmethod
    def _loops_allowed(name: str, value: int, trained: int, limit: int) -> None:
        """Refuse looping a T = 1 checkpoint (a server cannot warn its client, as ``loopmoe generate`` does),
        and a loop count above the server's limit."""
        if trained == 1 and value != 1:
            raise RequestError(
                f"{name}={value}: this checkpoint was trained with num_loops=1 (a Vanilla MoE without iteration "
                f"conditioning), so its layers were never trained to run repeatedly; leave {name} out (or use "
                "`loopmoe generate --num-loops`, which runs it with a warning)",
                param=name,
            )
        if value > limit:
            raise RequestError(
                f"{name}={value} is above this server's limit of {limit} loops (each loop costs a pass through the "
                "core): ask for fewer, or restart the server with a higher --max-num-loops",
                param=name,
            )


def read_completion(body: Any) -> Request:
    """A ``/v1/completions`` body as a ``Request``; ``RequestError`` for anything it cannot be."""
    fields = _fields(body, COMPLETION_FIELDS)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise RequestError(
            "prompt: give one prompt (a string) per request; concurrent requests are batched by the server",
            param="prompt",
        )
    if not isinstance(prompt, str):
        raise RequestError("prompt: required, a string", param="prompt")
    return Request(kind="completion", prompt=prompt, **_common(fields, "max_tokens"))


def read_chat(body: Any) -> Request:
    """A ``/v1/chat/completions`` body as a ``Request``; ``RequestError`` for anything it cannot be."""
    fields = _fields(body, CHAT_FIELDS)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: required, a non-empty list of {role, content} objects", param="messages")
    read = [_message(m, i) for i, m in enumerate(messages)]
    if "max_completion_tokens" in fields and "max_tokens" in fields:
        raise RequestError("give max_completion_tokens or max_tokens, not both", param="max_completion_tokens")
    if "max_completion_tokens" in fields:
        fields["max_tokens"] = fields.pop("max_completion_tokens")
    return Request(kind="chat", messages=read, **_common(fields, "max_tokens"))


def _fields(body: Any, known: tuple[str, ...]) -> dict[str, Any]:
    """The body's fields that matter: ``null`` dropped, neutral values of unimplemented fields dropped,
    anything else unknown refused; ``generation_config`` merged in under the body's own names."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    fields: dict[str, Any] = {}
    for name, value in body.items():
        if value is None or name in IGNORED_FIELDS:
            continue
        if name in NEUTRAL_VALUES:
            if any(type(value) is type(v) and value == v for v in NEUTRAL_VALUES[name]):
                continue
            raise RequestError(
                f"{name}={json.dumps(value)} is not supported by loopmoe serve: leave it out", param=name
            )
        if name not in known:
            raise RequestError(f"unknown field {name!r}; this endpoint reads: {', '.join(known)}", param=name)
        fields[name] = value
    if "generation_config" in fields:
        for name, value in _generation_config(fields.pop("generation_config")).items():
            if name == "max_tokens" and "max_completion_tokens" in fields:
                continue  # the body's own budget (chat's other name for it) wins
            fields.setdefault(name, value)
    return fields


def _generation_config(text: Any) -> dict[str, Any]:
    """The fields of a ``generation_config`` JSON string (transformers serve's extension) as body fields."""
    try:
        config = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as e:
        raise RequestError(f"generation_config is not valid JSON ({e})", param="generation_config") from None
    if not isinstance(config, dict):
        raise RequestError("generation_config: a JSON object in a string", param="generation_config")
    config.pop("transformers_version", None)
    fields: dict[str, Any] = {}
    do_sample = config.pop("do_sample", None)
    if do_sample is not None and not isinstance(do_sample, bool):
        raise RequestError("generation_config.do_sample: true or false", param="generation_config")
    for name, value in config.items():
        if name not in GENERATION_CONFIG_FIELDS:
            raise RequestError(
                f"generation_config.{name} is not supported by loopmoe serve; it reads "
                f"do_sample, {', '.join(GENERATION_CONFIG_FIELDS)}",
                param="generation_config",
            )
        if value is not None:
            fields[GENERATION_CONFIG_FIELDS[name]] = value
    if do_sample is False:
        fields["temperature"] = 0
    elif do_sample and fields.get("temperature") == 0:
        raise RequestError("generation_config: do_sample=true needs a temperature > 0", param="generation_config")
    return fields


def _message(message: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(f"{where}: an object with a string role and content", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(
                f"{where}.content: only text parts ({{type: text, text: ...}}) are supported", param="messages"
            )
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content: a string", param="messages")
    return {"role": message["role"], "content": content}


def _common(fields: dict[str, Any], budget: str) -> dict[str, Any]:
    """The fields both endpoints share, read and range-checked."""
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model: a string, the id /v1/models lists", param="model")
    max_tokens = fields.get(budget)
    if max_tokens is not None:
        max_tokens = _int(max_tokens, budget)
        if max_tokens < 1:
            raise RequestError(f"{budget}={max_tokens}: must be at least 1", param=budget)
    stop = fields.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop: a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream: true or false", param="stream")
    options = fields.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("stream_options: only {include_usage: true|false} is supported", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage: true or false", param="stream_options")
    return dict(
        model=model,
        max_tokens=max_tokens,
        stop=tuple(stop),
        stream=stream,
        include_usage=include_usage,
        decoding=_decoding(fields),
    )


def _decoding(fields: dict[str, Any]) -> Decoding:
    temperature = _number(fields.get("temperature", 1.0), "temperature")
    if temperature < 0:
        raise RequestError(f"temperature={temperature}: must be >= 0 (0 decodes greedily)", param="temperature")
    top_p = _number(fields.get("top_p", 1.0), "top_p")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p={top_p}: must be in (0, 1]", param="top_p")
    top_k = fields.get("top_k")
    if top_k is not None and _int(top_k, "top_k") < 1:
        raise RequestError(f"top_k={top_k}: must be >= 1", param="top_k")
    seed = fields.get("seed")
    if seed is not None and not 0 <= _int(seed, "seed") < 2**63:
        raise RequestError(f"seed={seed}: must be a whole number from 0 to 2**63 - 1", param="seed")
    num_loops = fields.get("num_loops")
    if num_loops is not None and _int(num_loops, "num_loops") < 1:
        raise RequestError(f"num_loops={num_loops}: must be a positive integer", param="num_loops")
    return Decoding(temperature, top_p, top_k, seed, num_loops, _exit_policy(fields))


def _exit_policy(fields: dict[str, Any]) -> ExitPolicy | None:
    """``exit`` ("CRITERION:THRESHOLD") or ``exit_criterion`` + ``exit_threshold``, bounded by
    ``min_loops`` / ``max_loops``; None when no criterion is given."""
    spec, criterion = fields.get("exit"), fields.get("exit_criterion")
    min_loops = _int(fields.get("min_loops", 1), "min_loops")
    max_loops = fields.get("max_loops")
    if max_loops is not None:
        max_loops = _int(max_loops, "max_loops")
    if spec is not None and (criterion is not None or "exit_threshold" in fields):
        raise RequestError("give exit (CRITERION:THRESHOLD) or exit_criterion + exit_threshold, not both", param="exit")
    if spec is not None:
        if not isinstance(spec, str):
            raise RequestError("exit: a string CRITERION:THRESHOLD, e.g. latent:0.03", param="exit")
        try:
            return ExitPolicy.parse(spec, min_loops=min_loops, max_loops=max_loops)
        except ConfigError as e:  # its message speaks of the command line's --exit
            raise RequestError(str(e).replace("--exit ", "exit ", 1), param="exit") from None
    if criterion is not None:
        if not isinstance(criterion, str):
            raise RequestError("exit_criterion: a string, e.g. latent", param="exit_criterion")
        threshold = _number(fields.get("exit_threshold", 0.0), "exit_threshold")
        return ExitPolicy(criterion, threshold, min_loops, max_loops)
    if "exit_threshold" in fields or "min_loops" in fields or "max_loops" in fields:
        raise RequestError(
            "exit_threshold, min_loops and max_loops bound an adaptive depth: give exit (CRITERION:THRESHOLD) "
            "or exit_criterion too",
            param="exit",
        )
    return None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name}={json.dumps(value)}: must be a whole number", param=name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name}={json.dumps(value)}: must be a finite number", param=name)
    return float(value)
