"""Continuous depth batching: batched decoding in which every sequence's token runs its own number of
core iterations, and no sequence waits for the slowest (docs/design.md §5).

Every core iteration uses the same weights; only IterAdaLN's iteration signal ``v_k`` (and the
re-injection, absent at k = 0) tells iterations apart. So one core forward can carry the tokens of
different sequences at different iterations, each with its own ``v_k`` (``IterationEncoder`` takes a
per-token iteration index) and each attending to its own sequence's KV slot for its own
(iteration, layer). The decoder here holds ``batch_slots`` sequences and runs *engine steps*:

1. sequences whose next token was just sampled run embedding and prelude on it (batched);
2. one core iteration for every occupied slot, each row at its own iteration k (batched: the
   projections, modulation and experts run once over all rows; attention reads, per row, the
   keys/values of its sequence at slot (k, l), padded to the longest sequence and masked);
3. the exit test per row (``adaptive.exit_values``, or the gate's ``gate_survival`` / ``gate_exits``,
   as batch-1 decoding tests it);
4. rows that exit: the KV rule fills their later iterations' slots at their position with the
   latest computed key/value, then coda, final norm, LM head and sampling run on them (batched);
   a sequence that reaches EOS or ``max_new_tokens`` frees its slot, and waiting requests are
   prefilled into the free slots (the adaptive forward over their prompts, left-padded together).

So a row that exits after one iteration goes on to its next token while its neighbours still
iterate, and the rows of one step are at different iterations (``DepthBatchingStats.mixed_steps``
counts such steps).

**Exactness.** The KV store follows adaptive depth's rule: at core layer l and iteration k an
exited position holds the key/value of the latest iteration it computed at layer l; prefill is the
adaptive forward itself. So each sequence's tokens are those of batch-1 adaptive generation
(``model.generate(prompt, exit_criterion=..., exit_threshold=...)``) under the same criterion, up
to floating-point rounding: rows computed in one batched matmul may round differently from batch
1, which can flip a greedy argmax at a near-tie or an exit at a value within rounding of the
threshold (``tests/model/test_depth_batching.py`` checks tokens and logits in float64, and equality
with lockstep batched generation when no token exits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from loopmoe.errors import ConfigError
from loopmoe.model.adaptive import HEAD_CRITERIA, ExitPolicy, exit_values, gate_exits, gate_survival
from loopmoe.model.modeling import LoopMoEForCausalLM

Sampler = Callable[[torch.Tensor], torch.Tensor]  # float32 scores [N, V] -> next tokens [N]


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """The most likely token per row (``generate``'s greedy search): [N, V] -> [N]."""
    return scores.argmax(-1)


def sampler(temperature: float, top_p: float = 1.0, top_k: int | None = None) -> Sampler:
    """Sampling at ``temperature`` after top-k and nucleus filtering, with transformers' own warpers
    (what ``generate(do_sample=True)`` applies); draws from torch's global generator."""
    warpers: list = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def sample(scores: torch.Tensor) -> torch.Tensor:
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]

    return sample


@dataclass
class DepthBatchingStats:
    """What a ``DepthBatchingDecoder.generate`` call ran: the compute adaptive depth saved, in core
    iterations per token (a core iteration is ``core_layers`` executed layers)."""

    max_loops: int
    core_layers: int
    sequences: int = 0
    prompt_tokens: int = 0
    decoded_tokens: int = 0  # generated tokens that went through the model again (all but each last one)
    new_tokens: int = 0
    steps: int = 0  # engine steps: one core iteration for every occupied slot
    mixed_steps: int = 0  # steps whose rows were at two or more different iterations
    prefill_iterations: int = 0  # core iterations executed over prompt tokens
    decode_iterations: int = 0  # core iterations executed over decoded tokens
    slot_rows: int = 0  # sum over steps of occupied slots (mean occupancy = slot_rows / steps)

    @property
    def iterations(self) -> int:
        return self.prefill_iterations + self.decode_iterations

    @property
    def full_iterations(self) -> int:
        """Core iterations full depth (``max_loops`` for every token) would have run."""
        return (self.prompt_tokens + self.decoded_tokens) * self.max_loops

    @property
    def saved(self) -> float:
        """Fraction of the core's token-iterations that exits skipped."""
        return 1 - self.iterations / max(self.full_iterations, 1)

    def summary(self) -> str:
        """One line: the engine's work and the share of the core's compute the exits skipped."""
        tokens = max(self.prompt_tokens + self.decoded_tokens, 1)
        return (
            f"depth batching: {self.sequences} sequences, {self.new_tokens} new tokens, {self.steps} engine steps "
            f"({self.slot_rows / max(self.steps, 1):.1f} rows per step, {self.mixed_steps} mixing iterations); "
            f"core iterations per token {self.iterations / tokens:.2f} of {self.max_loops} (executed "
            f"{self.iterations} of {self.full_iterations}, {self.iterations * self.core_layers} of "
            f"{self.full_iterations * self.core_layers} core-layer token-iterations): {self.saved:.1%} of the core skipped"
        )


@dataclass
class DepthBatchedOutput:
    sequences: list[torch.Tensor]  # per request, in request order: prompt + new tokens [n + m]
    exit_loops: list[torch.Tensor]  # per request: core iterations each fed position ran [n + m - 1]
    stats: DepthBatchingStats
    logits: list[torch.Tensor] | None = None  # per request, with output_logits: each new token's logits [m, V]


@dataclass
class _Request:
    index: int
    tokens: list[int]  # prompt, then the new tokens
    prompt_len: int
    loops: list[int] = field(default_factory=list)  # executed iterations per fed position
    forced: torch.Tensor | None = None  # [n + max_new] replayed iteration counts (exit_loops), or None
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per new token (output_logits)


class _RowKV:
    """The KV cache as one engine layer call sees it: row n writes its fresh key/value into its
    sequence's store row at (executed slot ``slots[n]``, its position) and reads back that slot's keys
    and values up to the longest row's position (``Attention.forward`` calls ``update`` as on any cache)."""

    def __init__(self, store: _KVStore, rows: _Rows, slots: torch.Tensor):
        self.store, self.rows = store, rows
        self.entries = store.entry(slots, rows.index)  # [N]

    def update(self, keys: torch.Tensor, values: torch.Tensor, cache_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        # keys / values: [N, H_kv, 1, hd] -> the rows' entries [N, H_kv, L, hd], L = longest position + 1
        rows, store, entries = self.rows, self.store, self.entries
        store.keys[entries, :, rows.positions] = keys[:, :, 0]
        store.values[entries, :, rows.positions] = values[:, :, 0]
        # index_select, not advanced indexing: the gather is a large share of a decoding step
        return (
            store.keys[:, :, : rows.length].index_select(0, entries),
            store.values[:, :, : rows.length].index_select(0, entries),
        )


@dataclass
class _KVStore:
    """Keys and values of every executed slot (execution order at ``max_loops``) of every batch slot, one
    entry per (executed slot, batch slot): entry ``slot · B + b``."""

    keys: torch.Tensor  # [(P + C·T + Q) · B, H_kv, capacity, hd]
    values: torch.Tensor
    batch: int  # B

    def entry(self, slot: torch.Tensor | int, b: torch.Tensor) -> torch.Tensor:
        return slot * self.batch + b


@dataclass
class _Rows:
    """Batch slots that run a layer together, one token each, and what their attention needs."""

    slots: list[int]  # batch slots, on the host
    index: torch.Tensor  # [N] the same, on the device
    positions: torch.Tensor  # [N] each token's position
    length: int  # longest position + 1: the keys every row's attention reads (padded)
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, signed sin [N, 1, hd]
    mask: torch.Tensor  # [N, 1, 1, length] bool: a row's own keys (position <= its own)


class DepthBatchingDecoder:
    """Batched decoding with continuous depth batching over a queue of prompts (module docstring).

    ``policy``: the exit policy (``ExitPolicy.parse("latent:0.03")``); None runs every token to full
    depth (``max_loops``: the model's num_loops), which is plain continuous batching and equals
    lockstep batched generation. ``batch_slots``: sequences decoded at once; more prompts wait and
    take a slot as soon as one frees.
    """

    def __init__(self, model: LoopMoEForCausalLM, policy: ExitPolicy | None = None, batch_slots: int = 8):
        if not isinstance(model, LoopMoEForCausalLM):
            raise ConfigError("continuous depth batching decodes a LoopMoEForCausalLM (it runs the core itself)")
        if batch_slots < 1:
            raise ConfigError(f"batch_slots={batch_slots}: must be >= 1")
        impl = model.config._attn_implementation
        if impl not in (None, "sdpa"):
            raise ConfigError(
                f"continuous depth batching attends with a padded per-row mask, which attn_implementation={impl!r} "
                "does not take: load the model with attn_implementation='sdpa'"
            )
        cfg = model.config
        self.model = model
        self.adaptive = policy is not None
        self.policy = policy.resolved(cfg) if policy is not None else ExitPolicy(max_loops=cfg.num_loops)
        self.batch_slots = batch_slots

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[torch.Tensor | Sequence[int]],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        sample: Sampler = greedy,
        exit_loops: Sequence[torch.Tensor] | None = None,
        output_logits: bool = False,
    ) -> DepthBatchedOutput:
        """Continue every prompt (1-D token ids) by up to ``max_new_tokens`` tokens, stopping a sequence
        at ``eos_token_id`` (kept, as ``generate`` keeps it). ``exit_loops``: per prompt, the core iterations
        each position runs (a 1-D tensor over prompt + new tokens), replacing or adding to the criterion
        as the forward's ``exit_loops`` does; a replay for tests. ``output_logits`` returns the logits each
        new token was chosen from (``generate``'s ``output_logits``)."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if exit_loops is not None and len(exit_loops) != len(prompts):
            raise ConfigError(f"exit_loops has {len(exit_loops)} entries for {len(prompts)} prompts: give one each")
        if not prompts:
            raise ConfigError("no prompt to continue: give at least one")
        requests = []
        for i, prompt in enumerate(prompts):
            tokens = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
            if not tokens:
                raise ConfigError(f"prompt {i} is empty: give each prompt at least one token")
            forced = exit_loops[i] if exit_loops is not None else None
            if forced is not None and forced.numel() < len(tokens) + max_new_tokens - 1:
                raise ConfigError(
                    f"exit_loops[{i}] has {forced.numel()} entries: give one per position of the prompt and the "
                    f"new tokens ({len(tokens) + max_new_tokens - 1})"
                )
            requests.append(_Request(i, tokens, len(tokens), forced=forced))
        adaptive = self.adaptive or exit_loops is not None  # a replay is adaptive depth without a criterion
        return _Run(self, requests, adaptive, max_new_tokens, eos_token_id, sample, output_logits).run()


class _Run:
    """One ``generate`` call's state: the slots, the KV store, the waiting queue.

    Per batch slot the host keeps the request, its token's position, iteration count and token
    (Python lists: the step's decisions need them on the host, and keeping them there costs no
    device synchronisation); the device keeps the hidden states and the KV store.
    """

    def __init__(
        self,
        decoder: DepthBatchingDecoder,
        requests: list[_Request],
        adaptive: bool,
        max_new: int,
        eos: int | None,
        sample: Sampler,
        output_logits: bool,
    ):
        model = decoder.model
        cfg = model.config
        self.model, self.core, self.cfg = model, model.model, cfg
        self.policy, self.adaptive, self.max_new, self.eos, self.sample = decoder.policy, adaptive, max_new, eos, sample
        assert self.policy.max_loops is not None  # resolved, or set from num_loops
        self.loops: int = self.policy.max_loops
        self.output_logits = output_logits
        self.waiting = list(reversed(requests))
        self.requests = requests
        B = self.B = decoder.batch_slots
        self.P, self.C = cfg.num_prelude_layers, cfg.num_core_layers
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.device = device
        capacity = max(r.prompt_len for r in requests) + max_new
        shape = (cfg.executed_depth(self.loops) * B, cfg.num_key_value_heads, capacity, cfg.head_dim)
        # Zeros, not empty: a masked key still multiplies its value by a zero weight, and 0·NaN is NaN.
        self.store = _KVStore(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), B
        )
        self.h = torch.zeros(B, cfg.hidden_size, device=device, dtype=dtype)  # each slot's hidden state
        self.e = torch.zeros_like(self.h)  # its token's prelude output (re-injected)
        self.prev_logp: torch.Tensor | None = None  # [B, V] the kl criterion's previous iteration
        self.log_survival = torch.zeros(B, device=device)  # the gate criterion's log ∏_{j<=k} (1 - λ_j) per slot
        self.occupant: list[_Request | None] = [None] * B
        self.iteration = [0] * B  # core iterations the slot's token has run
        self.position = [0] * B  # the slot's token's position
        self.token = [0] * B  # the slot's token
        self.fresh: list[int] = []  # slots whose token has not been through the prelude yet
        # v_k of every iteration, once (``IterationEncoder``'s per-token form gathers from it).
        encoder = self.core.iter_encoder
        self.v_table = (
            encoder(torch.arange(self.loops, device=device), param) if encoder is not None else None
        )  # [T, r]
        self.stats = DepthBatchingStats(max_loops=self.loops, core_layers=self.C)

    def run(self) -> DepthBatchedOutput:
        self._admit()
        while any(r is not None for r in self.occupant):
            self._step()
            self._admit()
        self.stats.sequences = len(self.requests)
        return DepthBatchedOutput(
            [torch.tensor(r.tokens) for r in self.requests],
            [torch.tensor(r.loops, dtype=torch.long) for r in self.requests],
            self.stats,
            [torch.stack(r.logits) for r in self.requests] if self.output_logits else None,
        )

    # -- requests in and out -------------------------------------------------------------------

    def _admit(self) -> None:
        """Prefill waiting requests into the free slots, together (again while a first token ends a sequence)."""
        while self.waiting:
            free = [b for b in range(self.B) if self.occupant[b] is None]
            if not free:
                return
            self._prefill([(b, self.waiting.pop()) for b in free[: len(self.waiting)]])

    def _prefill(self, joining: list[tuple[int, _Request]]) -> None:
        """The adaptive forward over the prompts of ``joining`` (batch slot, request), left-padded into one
        batch as ``generate`` pads a batch; each prompt's keys/values into its slot's store row."""
        S = max(r.prompt_len for _, r in joining)
        R = len(joining)
        ids = torch.zeros(R, S, dtype=torch.long)
        mask = torch.zeros(R, S, dtype=torch.long)
        forced = torch.ones(R, S, dtype=torch.long)  # a pad's iteration count is never read
        for j, (_, r) in enumerate(joining):
            ids[j, S - r.prompt_len :] = torch.tensor(r.tokens)
            mask[j, S - r.prompt_len :] = 1
            forced[j, S - r.prompt_len :] = r.forced[: r.prompt_len] if r.forced is not None else self.loops
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs: dict = {"num_loops": self.loops}
        p = self.policy
        if self.adaptive and p.criterion is not None:
            kwargs.update(exit_criterion=p.criterion, exit_threshold=p.threshold, min_loops=p.min_loops)
            kwargs.update(max_loops=self.loops)
        if self.adaptive and any(r.forced is not None for _, r in joining):
            kwargs.update(exit_loops=forced.to(self.device))
        cache = DynamicCache()
        out = self.model(
            ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),  # each prompt from position 0
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            output_router_stats=False,
            **kwargs,
        )
        # Every prompt token's key/value: batch row j, index S - n + t -> store row b, position t.
        pairs = [(j, b, S - r.prompt_len + t, t) for j, (b, r) in enumerate(joining) for t in range(r.prompt_len)]
        row, slot, source, target = (torch.tensor(c, device=self.device) for c in zip(*pairs))
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
            entry = self.store.entry(i, slot)
            self.store.keys[entry, :, target] = layer.keys[row, :, source]  # [M, H_kv, hd]
            self.store.values[entry, :, target] = layer.values[row, :, source]
        executed = out.exit_loops.tolist() if out.exit_loops is not None else None
        logits = out.logits[:, -1]  # [R, V]
        tokens = self.sample(logits.float()).tolist()
        for j, (b, r) in enumerate(joining):
            loops = executed[j][S - r.prompt_len :] if executed is not None else [self.loops] * r.prompt_len
            r.loops.extend(loops)
            self.stats.prompt_tokens += r.prompt_len
            self.stats.prefill_iterations += sum(loops)
            self.occupant[b] = r
            self.position[b] = r.prompt_len
            self._emit(b, tokens[j], logits[j])

    def _emit(self, b: int, token: int, logits: torch.Tensor) -> None:
        """Slot ``b``'s sequence gets ``token``, chosen from ``logits`` [V]: it finishes (the slot frees) or
        feeds it next."""
        request = self.occupant[b]
        assert request is not None
        if self.output_logits:
            request.logits.append(logits)
        request.tokens.append(token)
        self.stats.new_tokens += 1
        if token == self.eos or len(request.tokens) - request.prompt_len >= self.max_new:
            self.occupant[b] = None
            return
        self.token[b] = token
        self.iteration[b] = 0
        self.fresh.append(b)

    # -- one engine step -----------------------------------------------------------------------

    def _rows(self, slots: list[int]) -> _Rows:
        positions = [self.position[b] for b in slots]
        index = torch.tensor(slots, device=self.device)
        at = torch.tensor(positions, device=self.device)  # [N]
        length = max(positions) + 1
        rope = self.core.rotary_emb(self.h, at[:, None])  # cos, sin [N, 1, hd] (h: only its dtype is read)
        mask = (torch.arange(length, device=self.device) <= at[:, None])[:, None, None]  # [N, 1, 1, L]
        return _Rows(slots, index, at, length, rope, mask)

    def _layer(self, layer, x: torch.Tensor, rows: _Rows, slots: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
        """``layer`` on one token per row, ``x`` [N, 1, d] -> [N, 1, d]; row n's KV in executed slot ``slots[n]``."""
        x, _ = layer(x, rows.rope, rows.mask, _RowKV(self.store, rows, slots), 0, v, None, False)
        return x

    def _step(self) -> None:
        core, cfg = self.core, self.cfg
        if self.fresh:  # new tokens: embedding and prelude, batched over their slots
            rows = self._rows(self.fresh)
            x = core.embed_tokens(torch.tensor([self.token[b] for b in rows.slots], device=self.device))[:, None]
            for i, layer in enumerate(core.prelude):  # [F, 1, d]
                x = self._layer(layer, x, rows, torch.full_like(rows.index, i), None)
            self.h[rows.index] = x[:, 0]
            self.e[rows.index] = x[:, 0]
            self.fresh = []
        rows = self._rows([b for b in range(self.B) if self.occupant[b] is not None])
        ks = [self.iteration[b] for b in rows.slots]
        self.stats.steps += 1
        self.stats.slot_rows += len(ks)
        self.stats.mixed_steps += len(set(ks)) > 1
        self.stats.decode_iterations += len(ks)
        # One core iteration, each row at its own k: modeling.py's loop body, with k per row.
        k = torch.tensor(ks, device=self.device)  # [N]
        h = before = self.h[rows.index]  # [N, d]
        later = (k > 0)[:, None]
        if core.injection is not None:
            h = torch.where(later, core.injection(torch.cat([h, self.e[rows.index]], dim=-1)), h)
        elif cfg.input_injection == "add":
            h = torch.where(later, h + self.e[rows.index], h)
        if core.iter_embedding is not None:
            h = h + core.iter_embedding.weight[k]
        v = self.v_table[k][:, None] if self.v_table is not None else None  # [N, 1, r]
        x = h[:, None]  # [N, 1, d]
        for l, layer in enumerate(core.core):
            x = self._layer(layer, x, rows, self.P + k * self.C + l, v)
        h = x[:, 0]
        self.h[rows.index] = h
        done = [k_b + 1 for k_b in ks]
        for b, n in zip(rows.slots, done):
            self.iteration[b] = n
        exiting = self._exits(rows, h, before, done).tolist()
        out = [b for b, exits in zip(rows.slots, exiting) if exits]
        for b in out:
            self.occupant[b].loops.append(self.iteration[b])  # type: ignore[union-attr]  # occupied
        if out:
            self._finish_tokens(out)

    def _exits(self, rows: _Rows, h: torch.Tensor, before: torch.Tensor, done: list[int]) -> torch.Tensor:
        """Which rows' tokens stop iterating after ``done`` iterations ([N] bool): ``AdaptiveCore._exits``'s
        tests, per row (max_loops reached, a replayed count, the criterion below its threshold)."""
        policy, criterion = self.policy, self.policy.criterion
        stop = [n >= self.loops for n in done]
        for i, b in enumerate(rows.slots):
            forced = self.occupant[b].forced  # type: ignore[union-attr]  # occupied
            if self.adaptive and forced is not None and int(forced[self.position[b]]) <= done[i]:
                stop[i] = True
        # The criterion only for the rows that go on otherwise (AdaptiveCore skips the last boundary too:
        # the head criteria cost an LM head per row).
        live = [i for i, s in enumerate(stop) if not s]
        if not self.adaptive or criterion is None or not live:
            return torch.tensor(stop, device=self.device)
        at = torch.tensor(live, device=self.device)
        slots, h, before = rows.index[at], h[at], before[at]  # [M], [M, d], [M, d]
        testable = torch.tensor([done[i] >= policy.min_loops for i in live], device=self.device)
        if criterion == "gate":  # stateful: the product runs from the token's first boundary, whatever min_loops is
            assert self.core.exit_gate is not None  # ExitPolicy.resolved checked the config
            first = torch.tensor([done[i] == 1 for i in live], device=self.device)
            survival = torch.where(first, 0.0, self.log_survival[slots])
            survival = gate_survival(survival, self.core.exit_gate(h))  # [M]
            self.log_survival[slots] = survival
            below = gate_exits(survival, policy.threshold)
        else:
            logp = prev = None
            if criterion in HEAD_CRITERIA:
                logp = torch.log_softmax(self.model.lm_head(self.core.norm(h)).float(), dim=-1)  # [M, V]
                if self.prev_logp is None:
                    self.prev_logp = torch.zeros(self.B, logp.shape[-1], device=self.device)
                prev = self.prev_logp[slots]
                self.prev_logp[slots] = logp
            if criterion == "kl":  # a token's first boundary has nothing to compare with (as in AdaptiveCore)
                testable &= torch.tensor([done[i] >= 2 for i in live], device=self.device)
            below = exit_values(criterion, h, before, logp, prev) < policy.threshold
        exiting = torch.tensor(stop, device=self.device)
        exiting[at] = testable & below
        return exiting

    def _finish_tokens(self, slots: list[int]) -> None:
        """The KV rule for the exiting rows, then coda, head and sampling; each emits its next token."""
        P, C, store = self.P, self.C, self.store
        # The slots after a token's last iteration hold, at its position, its latest key/value (the KV rule).
        fills = [(b, later, self.iteration[b] - 1) for b in slots for later in range(self.iteration[b], self.loops)]
        if fills:
            b_, later_, last_ = (torch.tensor(column, device=self.device) for column in zip(*fills))
            at = torch.tensor([self.position[b] for b, _, _ in fills], device=self.device)
            for l in range(C):
                to, latest = store.entry(P + later_ * C + l, b_), store.entry(P + last_ * C + l, b_)
                for kv in (store.keys, store.values):
                    kv[to, :, at] = kv[latest, :, at]
        rows = self._rows(slots)
        x = self.h[rows.index][:, None]  # [X, 1, d]
        coda = P + self.loops * C
        for j, layer in enumerate(self.core.coda):
            x = self._layer(layer, x, rows, torch.full_like(rows.index, coda + j), None)
        logits = self.model.lm_head(self.core.norm(x))[:, 0]  # [X, V]
        tokens = self.sample(logits.float()).tolist()
        self.stats.decoded_tokens += len(slots)
        for b, token, row in zip(slots, tokens, logits):
            self.position[b] += 1
            self._emit(b, token, row)
