"""Adaptive depth: per-token early exit at loop boundaries that skips the compute it saves (docs/design.md §5).

After each full iteration of the core, every token still iterating is tested by an exit criterion;
a token that exits keeps its hidden state and takes part in no later iteration: its core layers do
not run for it (projections, attention queries, experts). The coda, the final norm and the LM head
then run on every token, as at full depth.

Criteria (a token exits when its value is below the threshold, after at least ``min_loops`` and at
most ``max_loops`` iterations):

- ``latent``: relative change of the hidden state over the iteration, ``|h_k - h_{k-1}| / |h_k|``
  (the iteration's input for the first one);
- ``cosine``: cosine distance of the same two states, ``1 - cos(h_k, h_{k-1})``;
- ``kl``: ``KL(p_k || p_{k-1})`` between successive iterations' next-token distributions, each
  through the final norm and the LM head (the coda is not run for it): ``2·V·d`` FLOPs per active
  token per iteration, a large share of a small model's (it needs two iterations to test at all);
- ``entropy``: the entropy of ``p_k`` in nats, through the same head (a confident token exits);
- ``gate``: a learned exit gate (``config.exit_gate``, Ouro's): the halting probability
  ``λ_k = sigmoid(w · RMSNorm(h_k) + b)`` defines the exit distribution ``p_k = λ_k ∏_{j<k} (1 - λ_j)``,
  and a token exits once its cumulative exit probability ``Σ_{j≤k} p_j = 1 - ∏_{j≤k} (1 - λ_j)``
  *reaches* the threshold (Ouro's rule; the one criterion tested by ``>=``): 0 exits at ``min_loops``,
  a threshold above 1 never exits. ``2·d`` FLOPs per active token and iteration; the product goes on
  past the trained T when ``max_loops`` exceeds it (``exit_distribution`` is the training side).

**The KV rule.** Later iterations still attend to an exited token's position: at core layer l and
iteration k its key and value are those of the latest iteration it computed at the same layer
(Huginn's rule). The same rule holds in prefill, scoring and decoding: a cached forward appends,
for every position, the key and value its slot reads under this rule, so a cached generation
equals an uncached one under the same exits. Tokens of one forward are at the same iteration;
batched decoding in lockstep saves compute only while every row has exited. Continuous depth
batching (``depth_batching.py``) runs rows at different iterations in one core forward, under the
same criteria and KV rule.

**Exactness.** An iteration in which every token is still active runs the layers exactly as the
full-depth forward does (the same calls), so a threshold that never exits gives full depth bit for
bit, and ``min_loops = max_loops = 1`` with any always-exiting threshold gives the T = 1 forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loopmoe.errors import ConfigError
from loopmoe.model.layers import apply_rotary

CRITERIA = ("latent", "cosine", "kl", "entropy", "gate")
HEAD_CRITERIA = ("kl", "entropy")  # read the next-token distribution through the final norm and LM head


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of exiting after each of T iterations, from the halting logits of the first T - 1.

    gate_logits: [T - 1, ...] (``z_t``, ``λ_t = sigmoid(z_t)``) -> [T, ...] fp32 ``log p_t`` with
    ``p_t = λ_t ∏_{s<t} (1 - λ_s)`` for t < T and ``p_T = ∏_{s<T} (1 - λ_s)`` (Ouro's exit distribution;
    it sums to one). In log space (``log λ = logsigmoid(z)``, ``log(1 - λ) = logsigmoid(-z)``), so no
    probability underflows into a ``0 · log 0`` in the entropy.
    """
    z = gate_logits.float()
    stay = torch.nn.functional.logsigmoid(-z).cumsum(0)  # [T - 1]: log ∏_{s<=t} (1 - λ_s)
    survive = torch.cat([z.new_zeros(1, *z.shape[1:]), stay])  # [T]: log ∏_{s<t} (1 - λ_s)
    return torch.cat([torch.nn.functional.logsigmoid(z) + survive[:-1], survive[-1:]])


@dataclass(frozen=True)
class ExitPolicy:
    """When a token stops iterating: ``criterion`` below ``threshold`` (``gate``: its cumulative exit
    probability at or above it), between ``min_loops`` and ``max_loops``.

    ``criterion=None`` runs every token ``max_loops`` times unless ``exit_loops`` (a forward argument)
    fixes each token's iteration count (what the tests replay to compare cached and uncached runs).
    """

    criterion: str | None = None
    threshold: float = 0.0
    min_loops: int = 1
    max_loops: int | None = None  # None: the trained num_loops; may exceed it (test-time depth)

    @classmethod
    def parse(cls, spec: str, **kwargs) -> ExitPolicy:
        """``"latent:0.03"`` (the command line's ``--exit``) as a policy."""
        name, sep, value = spec.partition(":")
        if not sep:
            raise ConfigError(f"--exit {spec!r}: give CRITERION:THRESHOLD, e.g. latent:0.03 ({', '.join(CRITERIA)})")
        try:
            threshold = float(value)
        except ValueError:
            raise ConfigError(f"--exit {spec!r}: the threshold {value!r} is not a number, e.g. latent:0.03") from None
        return cls(name.strip(), threshold, **kwargs)

    def resolved(self, config) -> ExitPolicy:
        """This policy checked against ``config``, with ``max_loops`` filled in; ConfigError naming the fix."""
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise ConfigError(f"unknown exit criterion {self.criterion!r}: use one of {', '.join(CRITERIA)}")
        if self.criterion == "gate" and not getattr(config, "exit_gate", False):
            others = ", ".join(c for c in CRITERIA if c != "gate")
            raise ConfigError(
                "the 'gate' exit criterion reads a learned exit gate, which needs a model trained with one "
                f"(model.exit_gate=true); this model has none: use one of {others}"
            )
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(f"exit threshold {self.threshold!r}: must be a finite number >= 0")
        if self.criterion == "cosine" and self.threshold > 2:
            raise ConfigError(f"cosine exit threshold {self.threshold}: a cosine distance lies in [0, 2]")
        max_loops = config.num_loops if self.max_loops is None else self.max_loops
        if config.num_loops == 1 and max_loops == 1:
            raise ConfigError(
                "early exit needs a looped model: this checkpoint runs its core once (num_loops=1); "
                "give max_loops > 1 to loop it at test time, or use a LoopMoE with num_loops > 1"
            )
        if not 1 <= self.min_loops <= max_loops:
            raise ConfigError(
                f"need 1 <= min_loops <= max_loops, got min_loops={self.min_loops}, max_loops={max_loops}"
            )
        config.check_num_loops(max_loops)
        return ExitPolicy(self.criterion, float(self.threshold), self.min_loops, max_loops)


def gate_survival(log_survival: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """The ``gate`` criterion's state one boundary on: ``log ∏_{j<=k} (1 - λ_j)`` [N] fp32, from the previous
    one (zeros before the first boundary) and this boundary's halting logits ``z_k`` [N]."""
    return log_survival + torch.nn.functional.logsigmoid(-gate_logits.float())


def gate_exits(log_survival: torch.Tensor, threshold: float) -> torch.Tensor:
    """Ouro's rule: a token exits once its cumulative exit probability ``1 - ∏_{j<=k} (1 - λ_j)`` reaches
    ``threshold`` (``>=``: 0 always exits, above 1 never). log_survival [N] -> [N] bool."""
    return -torch.expm1(log_survival) >= threshold


def exit_values(
    criterion: str, h: torch.Tensor, before: torch.Tensor, logp: torch.Tensor | None, prev_logp: torch.Tensor | None
) -> torch.Tensor:
    """The criterion per token: h / before [N, d], logp / prev_logp [N, V] (head criteria) -> [N].

    Not ``gate``, whose test carries a state across boundaries: ``gate_survival`` and ``gate_exits``.
    """
    if criterion == "gate":
        raise ConfigError("the gate criterion is stateful: test it with gate_survival and gate_exits")
    if criterion == "latent":
        return (h - before).float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)
    if criterion == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(h.float(), before.float(), dim=-1)
    assert logp is not None
    if criterion == "entropy":
        return -(logp.exp() * logp).sum(-1)
    if prev_logp is None:  # kl before a second iteration: nothing to compare with, nobody exits
        return torch.full(logp.shape[:1], math.inf, device=logp.device)
    return (logp.exp() * (logp - prev_logp)).sum(-1)


@dataclass
class AdaptiveCore:
    """One forward's adaptive run of the core (built by ``LoopMoEModel.forward``)."""

    model: Any  # the LoopMoEModel (typed loosely: modeling.py imports this module)
    policy: ExitPolicy  # resolved
    exit_loops: torch.Tensor | None  # [B, S] forced iteration counts, or None
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None  # final norm + LM head, for kl / entropy
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, signed sin: [1 or B, S, hd]
    positions: torch.Tensor  # [B, S] absolute positions of the chunk's tokens
    key_padding: torch.Tensor | None  # [B, past + S] bool, False on padding keys; None: no padding
    cache: Cache | None
    # The gate criterion's running log ∏_{j<=k} (1 - λ_j) per token [B, S] (set at the first boundary).
    log_survival: torch.Tensor | None = None

    def run(self, h: torch.Tensor, run_layer, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The core on ``h`` [B, S, d] -> (h, executed iterations per token [B, S])."""
        model, policy = self.model, self.policy
        cfg = model.config
        B, S, _ = h.shape
        loops = policy.max_loops
        assert loops is not None
        active = torch.ones(B, S, dtype=torch.bool, device=h.device)
        executed = torch.zeros(B, S, dtype=torch.long, device=h.device)
        # Without a cache of its own the forward still needs each core layer's keys and values for
        # the iterations after the first exit: a private cache holds them (never returned).
        cache = self.cache if self.cache is not None else _private_cache(cfg, loops)
        latest: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.core)
        prev_logp: torch.Tensor | None = None
        for k in range(loops):
            if not active.any():  # everyone has exited: the remaining slots get the latest K/V (the KV rule)
                for l in range(len(model.core)):
                    cache.update(*latest[l], model.slot("core", l, k, loops).cache_index)  # type: ignore[misc]  # set by iteration 0
                continue
            everyone = bool(active.all())
            before = h
            stepped = h
            if k > 0 and model.injection is not None:
                stepped = model.injection(torch.cat([stepped, e], dim=-1))
            elif k > 0 and cfg.input_injection == "add":
                stepped = stepped + e
            if model.iter_embedding is not None:
                stepped = stepped + model.iter_embedding.weight[k]
            v_k = model.iter_encoder(k, stepped) if model.iter_encoder is not None else None
            if not everyone:  # exited tokens keep their state: the iteration's input changes active ones only
                stepped = torch.where(active[..., None], stepped, h)
            h = stepped
            for l, layer in enumerate(model.core):
                slot = model.slot("core", l, k, loops)
                if everyone:  # the full-depth call itself: bit for bit what the plain forward computes
                    h = run_layer(layer, h, slot, v_k, cache)
                    keys, values = cache.layers[slot.cache_index].keys, cache.layers[slot.cache_index].values
                    latest[l] = (keys[:, :, -S:], values[:, :, -S:])
                else:
                    h, latest[l] = self._active_layer(layer, h, active, latest[l], slot, v_k, cache)
            executed += active.long()
            done = k + 1
            if done == loops:
                break
            exits = self._exits(h, before, active, done, prev_logp)
            if self.policy.criterion in HEAD_CRITERIA:
                prev_logp = exits[1]
            active = active & ~exits[0]
        return h, executed

    def _exits(
        self, h: torch.Tensor, before: torch.Tensor, active: torch.Tensor, done: int, prev_logp: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which active tokens exit after ``done`` iterations ([B, S] bool), and the head log-probs (kl)."""
        exiting = torch.zeros_like(active)
        if self.exit_loops is not None:
            exiting |= active & (self.exit_loops <= done)
        criterion = self.policy.criterion
        if criterion is None:
            return exiting, None
        logp = None
        if criterion in HEAD_CRITERIA:
            assert self.logits_fn is not None
            logp = torch.log_softmax(self.logits_fn(h).float(), dim=-1)  # [B, S, V]
        if criterion == "gate":  # the product runs from the first boundary, whatever min_loops is
            rows = active
            if self.log_survival is None:
                self.log_survival = torch.zeros(active.shape, dtype=torch.float32, device=h.device)
            self.log_survival[rows] = gate_survival(self.log_survival[rows], self.model.exit_gate(h[rows]))
            if done >= self.policy.min_loops:
                exiting[rows] |= gate_exits(self.log_survival[rows], self.policy.threshold)
            return exiting, None
        if done >= self.policy.min_loops:
            rows = active
            value = exit_values(
                criterion,
                h[rows],
                before[rows],
                logp[rows] if logp is not None else None,
                prev_logp[rows] if prev_logp is not None else None,
            )
            below = torch.zeros_like(active)
            below[rows] = value < self.policy.threshold
            exiting |= below
        return exiting, logp

    def _active_layer(
        self, layer: Any, h: torch.Tensor, active: torch.Tensor, latest: Any, slot: Any, v_k: Any, cache: Any
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``layer`` on the active tokens of ``h`` only (gathered per row, padded to the longest row);
        the exited tokens' keys and values are ``latest``'s. Returns (h, the slot's keys/values [B, H_kv, S, hd])."""
        B, S, d = h.shape
        keys, values = latest
        counts = active.sum(1)
        A = int(counts.max())
        if A == 0:
            cache.update(keys, values, slot.cache_index)
            return h, latest
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :A]  # [B, A]: active first
        valid = torch.arange(A, device=h.device)[None] < counts[:, None]  # [B, A]
        x = h.gather(1, order[..., None].expand(B, A, d))
        cos, sin = (t.expand(B, -1, -1).gather(1, order[..., None].expand(B, A, t.shape[-1])) for t in self.rope)
        rows, cols = valid.nonzero(as_tuple=True)
        positions = order[rows, cols]
        slot_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def attend(y: torch.Tensor) -> torch.Tensor:
            # y: [B, A, d], the active tokens' normed input -> their attention output [B, A, d]
            attn = layer.self_attn
            hd = attn.head_dim
            q = attn.q_proj(y).view(B, A, -1, hd)
            kk = attn.k_proj(y).view(B, A, -1, hd)
            vv = attn.v_proj(y).view(B, A, -1, hd)
            if attn.q_norm is not None and attn.k_norm is not None:
                q, kk = attn.q_norm(q), attn.k_norm(kk)
            q, kk = apply_rotary(q.transpose(1, 2), kk.transpose(1, 2), cos, sin)  # [B, H(_kv), A, hd]
            # The KV rule: the active tokens' fresh keys/values replace their latest; exited ones keep theirs.
            new_keys, new_values = keys.transpose(1, 2).clone(), values.transpose(1, 2).clone()  # [B, S, H_kv, hd]
            new_keys[rows, positions] = kk.transpose(1, 2)[rows, cols]
            new_values[rows, positions] = vv[rows, cols]
            slot_kv.append((new_keys.transpose(1, 2), new_values.transpose(1, 2)))
            all_keys, all_values = cache.update(*slot_kv[0], slot.cache_index)  # [B, H_kv, past + S, hd]
            past = all_keys.shape[2] - S
            key_pos = torch.cat([torch.arange(past, device=h.device).expand(B, past), self.positions], dim=1)
            query_pos = self.positions.gather(1, order)  # [B, A]
            allowed = key_pos[:, None, :] <= query_pos[:, :, None]  # [B, A, past + S]
            if self.key_padding is not None:
                allowed = allowed & self.key_padding[:, None, :]
            out, _ = sdpa_attention_forward(
                attn, q, all_keys, all_values, allowed[:, None], dropout=0.0, scaling=attn.scaling
            )
            return attn.o_proj(out.reshape(B, A, -1))

        x, _ = layer(x, self.rope, None, None, slot.cache_index, v_k, valid, False, attend=attend)
        h = h.clone()
        h[rows, positions] = x[rows, cols]
        return h, slot_kv[0]


def _private_cache(config, loops: int) -> DynamicCache:
    cache = DynamicCache()
    while len(cache.layers) < config.executed_depth(loops):
        cache.layers.append(DynamicLayer())
    return cache
