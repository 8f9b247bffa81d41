"""Analytic budgets of a LoopMoEConfig (docs/design.md §6), asserted against the real model.

Per layer, with width d, heads H / H_kv, head size h_d, E experts of size f, top-k, shared f_s::

    A = d*H*h_d + 2*d*H_kv*h_d + H*h_d*d   (+ QK-norm and the layer's norms in parameter counts)
    F = 3*w*f        G = 3*d*f_s        R = d_R*E        D = 2*d*d_e (DCCA) or 0
    M = IterAdaLN parameters of a core layer
    total(layer) = A + E*F + G + R + D + M     active(layer) = A + k*F + G + R + D + M

where w is the width the experts work at (d, or d_e = dcca_dim for DCCA experts), D the DCCA layer's
descending and ascending projections, and d_R the router's input width (d, or d_e when a DCCA router
scores the descended vector).

Forward FLOPs per token count the multiply-adds of every matmul a token's computation executes
(2 per weight of each executed linear map, the LM head included), plus attention scores
``2*2*h_d*H*S`` per executed layer over the full S x S matmuls (the FlopCounterMode / MFU
convention). Element-wise work (norms, activations, routing softmax) is not counted, and
neither is work done once per sequence rather than per token (``MLP_iter(PE(k))``).

The attention-to-FFN active ratio has two readings (docs/design.md §6). ``attn_ffn_ratio`` is
``unique attention parameters / FFN parameters executed per token`` (ours; the FFN includes DCCA's
projections): a looped model touches the attention of P + C + Q layers but runs its FFNs on all
P + C*T + Q executed layers, so looping the same shapes divides it by T. ``attn_ffn_ratio_per_layer``
is ``A / phi``, the attention and FFN weights a token multiplies in one executed layer, which a
looped model with the reference's shapes keeps. Capacity balancing matches the first, the
``per_layer`` strategy the second (``loopmoe.balance``).

A learned exit gate (``exit_gate``, docs/design.md §5) adds ``d + 1`` parameters. The forward
FLOPs above are those of a full-depth forward, which never runs the gate; the gate's training loss
reads every iteration out, which ``exit_gate_flops_per_token`` counts on top: per token, for each of
the ``T - 1`` earlier iterations, the coda layers, the LM head and the gate (``2 d``).

``all_to_all_bytes_per_token`` is the expert-parallel communication a token causes (BigMac's eq. 1
per token): its k rows of width w leave for other ranks and come back, in every executed MoE layer
(forward, or forward and backward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

from loopmoe.config import ExpertType, IterConditioning, LoopMoEConfig, expert_width, router_width
from loopmoe.errors import ConfigError

# A LoopMoEConfig, or any object with its fields: the balancing search scores thousands of
# candidates as plain namespaces, far cheaper to build than a transformers config.
ConfigLike = LoopMoEConfig | SimpleNamespace


@dataclass(frozen=True)
class LayerShapes:
    """Per-layer parameter counts, split by role."""

    attention: int  # A, projections only
    attention_norms: int  # QK-norm weights
    layer_norms: int  # pre (and sandwich post) norms
    expert: int  # F
    shared: int  # G
    router: int  # R
    projections: int  # D: DCCA's descending and ascending projections
    modulation_token: int  # W_h + its RMSNorm: run per token
    modulation_out: int  # W_mod weight + bias


@dataclass(frozen=True)
class Budget:
    total_params: int
    active_params: int
    flops_per_token: int
    attn_ffn_ratio: float  # unique attention / executed FFN (design §6, ours): capacity balancing's reading
    seq_len: int
    executed_depth: int
    unique_layers: int
    # Where the forward FLOPs of a token go (the rest: routers, the LM head, concat injection).
    attention_flops_per_token: int = 0  # projections and S x S scores, every executed layer
    ffn_flops_per_token: int = 0  # k routed experts, shared experts, DCCA projections, every executed layer
    modulation_flops_per_token: int = 0  # IterAdaLN's per-token matmuls, every executed core layer
    # Forward FLOPs the exit gate's training loss adds (readouts of the T - 1 earlier iterations), 0 without a gate.
    exit_gate_flops_per_token: int = 0
    attn_ffn_ratio_per_layer: float = 0.0  # A / phi: attention / FFN weights one executed layer multiplies

    def as_dict(self) -> dict:
        return asdict(self)


def layer_shapes(cfg: ConfigLike, core: bool) -> LayerShapes:
    d, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    r = cfg.iter_cond_rank
    cond = IterConditioning(cfg.iter_conditioning)
    token_mod, any_mod = core and cond.uses_token, core and cond.modulates
    return LayerShapes(
        attention=d * H * hd + 2 * d * Hkv * hd + H * hd * d,
        attention_norms=2 * hd if cfg.qk_norm else 0,
        layer_norms=(2 if cfg.norm_scheme == "pre" else 4) * d,
        expert=3 * expert_width(cfg) * cfg.moe_intermediate_size,
        shared=3 * d * cfg.shared_expert_intermediate_size,
        router=router_width(cfg) * cfg.num_experts,
        projections=2 * d * expert_width(cfg) if ExpertType(cfg.expert_type).projects else 0,
        modulation_token=(d + d * r) if token_mod else 0,
        modulation_out=(r * 6 * d + 6 * d) if any_mod else 0,
    )


def global_params(cfg: ConfigLike) -> int:
    """Parameters outside the layers: embeddings, LM head, final norm, conditioning, injection, exit gate."""
    d, r, p = cfg.hidden_size, cfg.iter_cond_rank, cfg.iter_pe_dim
    cond = IterConditioning(cfg.iter_conditioning)
    n = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    if cond.uses_iteration:
        n += p * r + r + r * r + r  # MLP_iter
    if cond.embeds_iteration:
        n += cfg.max_loops * d
    if cfg.input_injection == "concat":
        n += 2 * d * d
    if cfg.exit_gate:
        n += d + 1  # w and b of the halting logit w · RMSNorm(h) + b
    return n


def modulation_matmul_weights(cfg: ConfigLike) -> int:
    """Weights of IterAdaLN's per-token matmuls in one executed core layer: ``W_h`` (r x d) and
    ``W_mod`` (6d x r) when the modulation reads the token, else 0 (from k alone it is one vector
    per sequence). Balancing charges the same cost (``loopmoe.balance``)."""
    d, r = cfg.hidden_size, cfg.iter_cond_rank
    return d * r + r * 6 * d if IterConditioning(cfg.iter_conditioning).uses_token else 0


def ffn_matmul_weights(cfg: ConfigLike, s: LayerShapes) -> int:
    """FFN weights one token's forward multiplies in a layer: k routed experts, the shared
    experts and DCCA's two projections (the router is not counted as FFN)."""
    return cfg.num_experts_per_tok * s.expert + s.shared + s.projections


def all_to_all_row_bytes(cfg: ConfigLike, bytes_per_element: int = 2) -> int:
    """Bytes of the rows one token puts into one expert-parallel row exchange: its k rows of width
    w (d, or d_e for DCCA). ``loopmoe.planning.comm`` sizes each all_to_all's send buffer with it."""
    return cfg.num_experts_per_tok * expert_width(cfg) * bytes_per_element


def all_to_all_bytes_per_token(
    cfg: ConfigLike, ep: int, bytes_per_element: int = 2, num_loops: int | None = None, backward: bool = False
) -> float:
    """Bytes of token rows one token sends to other ranks through the expert-parallel all_to_all,
    expected under uniform routing over ``ep`` ranks (the one home of this formula; docs/design.md
    §6). In each of the ``P + C*T + Q`` executed MoE layers its k rows of width w (d, or d_e for
    DCCA) are dispatched and their outputs returned, and a row leaves its rank with probability
    ``(ep - 1) / ep``; the backward pass (``backward=True``) runs both exchanges again, reversed::

        X * k * w * bytes_per_element * (ep - 1) / ep * (P + C*T + Q),   X = 2 (forward) or 4 (+ backward)

    (BigMac's ``C = 2 top_k (ep-1)/ep b s h``, per token and over the executed depth.) Routing that is
    not uniform scales it by the realised off-rank share over ``(ep - 1) / ep``. Not included: the
    per-expert counts exchanged beside the rows (``8 E (ep - 1) / ep`` bytes per layer and rank, not
    per token) and the forward exchanges activation checkpointing re-runs. ``bytes_per_element``: 2
    for bf16, 4 for fp32.
    """
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"the expert-parallel degree ep must be a whole number >= 1, got {ep!r}")
    T = cfg.num_loops if num_loops is None else num_loops
    executed = cfg.num_prelude_layers + cfg.num_core_layers * T + cfg.num_coda_layers
    exchanges = 4 if backward else 2
    return exchanges * executed * all_to_all_row_bytes(cfg, bytes_per_element) * (ep - 1) / ep


def layer_params(s: LayerShapes, experts: int) -> int:
    """Parameters of one layer of shapes ``s`` holding ``experts`` experts (pass k for the active count).

    The one per-layer count: the budget, the planner's FSDP2 units and its memory model read it.
    """
    return (
        s.attention
        + s.attention_norms
        + s.layer_norms
        + experts * s.expert
        + s.shared
        + s.router
        + s.projections
        + s.modulation_token
        + s.modulation_out
    )


def compute_budget(cfg: ConfigLike, seq_len: int, num_loops: int | None = None) -> Budget:
    """Total / active parameters, forward FLOPs per token at ``seq_len``, and the attention/FFN ratio."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    T = cfg.num_loops if num_loops is None else num_loops
    plain, core = layer_shapes(cfg, core=False), layer_shapes(cfg, core=True)
    n_plain = cfg.num_prelude_layers + cfg.num_coda_layers
    C, k, E = cfg.num_core_layers, cfg.num_experts_per_tok, cfg.num_experts
    d, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim

    total = global_params(cfg) + n_plain * layer_params(plain, E) + C * layer_params(core, E)
    active = global_params(cfg) + n_plain * layer_params(plain, k) + C * layer_params(core, k)

    def layer_matmul_weights(s: LayerShapes) -> int:
        return s.attention + ffn_matmul_weights(cfg, s) + s.router

    scores = 2 * 2 * hd * H * seq_len
    executed = n_plain + C * T
    flops = 2 * n_plain * layer_matmul_weights(plain)
    flops += 2 * C * T * (layer_matmul_weights(core) + modulation_matmul_weights(cfg))
    flops += executed * scores
    flops += 2 * cfg.vocab_size * d  # LM head
    if cfg.input_injection == "concat":
        flops += 2 * (T - 1) * 2 * d * d

    gate = 0
    if cfg.exit_gate:  # the training loss reads iterations 1..T-1 out: coda, LM head and the gate each
        coda = cfg.num_coda_layers * (2 * layer_matmul_weights(plain) + scores)
        gate = (T - 1) * (coda + 2 * cfg.vocab_size * d + 2 * d)

    unique_attention = (n_plain + C) * (plain.attention + plain.attention_norms)
    executed_ffn = executed * ffn_matmul_weights(cfg, plain)
    return Budget(
        total_params=total,
        active_params=active,
        flops_per_token=flops,
        attn_ffn_ratio=unique_attention / executed_ffn,
        seq_len=seq_len,
        executed_depth=executed,
        unique_layers=n_plain + C,
        attention_flops_per_token=executed * (2 * plain.attention + scores),
        ffn_flops_per_token=2 * executed_ffn,
        modulation_flops_per_token=2 * C * T * modulation_matmul_weights(cfg),
        exit_gate_flops_per_token=gate,
        attn_ffn_ratio_per_layer=plain.attention / ffn_matmul_weights(cfg, plain),
    )


def adaptive_flops_per_token(
    cfg: ConfigLike, seq_len: int, mean_loops: float, criterion: str | None = None, max_loops: int | None = None
) -> float:
    """Forward FLOPs per token under adaptive depth (docs/design.md §5): the T = 1 forward, one core
    iteration's FLOPs for each further iteration a token runs on average, and the exit tests' cost at
    each tested boundary but the last: the LM head (``kl``, ``entropy``: ``2·V·d`` per active token) or
    the learned gate (``gate``: ``2·d``)."""
    one = compute_budget(cfg, seq_len, num_loops=1).flops_per_token
    iteration = compute_budget(cfg, seq_len, num_loops=2).flops_per_token - one
    flops = one + (mean_loops - 1) * iteration
    test = {
        "kl": cfg.vocab_size * cfg.hidden_size,
        "entropy": cfg.vocab_size * cfg.hidden_size,
        "gate": cfg.hidden_size,
    }
    if criterion in test:
        loops = cfg.num_loops if max_loops is None else max_loops
        flops += 2 * test[criterion] * min(mean_loops, loops - 1)
    return flops
