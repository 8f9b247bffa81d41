"""LoopMoE: a looped Mixture-of-Experts decoder, and the Vanilla MoE it is compared against.

Architecture (docs/design.md §1-§5), top to bottom, as ``LoopMoEModel.forward`` runs it:

    h = embed(tokens)                                   # [B, S, d]
    for i in range(P): h = prelude[i](h)                # once
    e = h
    for k in range(T):                                  # the same C core layers, T times
        if k > 0: h = inject(h, e)                      # optional: h + e, or W [h; e]
        v_k = MLP_iter(PE(k))                           # iteration signal (IterAdaLN)
        for l in range(C): h = core[l](h, v_k)          # modulated from v_k and h
    for j in range(Q): h = coda[j](h)                   # once
    logits = lm_head(norm(h))

- optional learned exit gate (``exit_gate``): a halting logit per token after each core iteration,
  trained with Ouro's entropy-regularised expected loss over the iterations' readouts (``ExitGate``,
  ``LoopMoEForCausalLM.exit_gate_objective``) and read by the ``gate`` exit criterion (``adaptive.py``);

- each layer: GQA attention with RoPE and optional QK-norm, through SDPA, then a dropless
  sparse MoE FFN (``moe.py``); norm scheme pre-norm, sandwich, or depth-scaled sandwich with
  TinyInit;
- core layers may be conditioned on the iteration (``conditioning.py``): IterAdaLN by default
  when T > 1; with T = 1 and no conditioning this is a Vanilla MoE, weight-compatible with
  Qwen3-MoE;
- every executed (iteration, layer) is a ``Slot`` (``slots.py``) with its own KV-cache entry and
  router statistics; ``num_loops=`` on forward/generate changes T at inference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from loopmoe.config import SANDWICH_ATTN_GAIN, SANDWICH_FFN_GAIN, LoopMoEConfig
from loopmoe.errors import ConfigError
from loopmoe.model.adaptive import HEAD_CRITERIA, AdaptiveCore, ExitPolicy, exit_distribution
from loopmoe.model.conditioning import IterationEncoder, Modulation, ZeroInitLinear
from loopmoe.model.kernels.cross_entropy import causal_targets, linear_cross_entropy, weighted_linear_cross_entropy
from loopmoe.model.layers import Attention, Linear, RMSNorm, RotaryEmbedding
from loopmoe.model.moe import Experts, RouterStats, SparseMoE, TopKRouter
from loopmoe.model.remote_code import auto_map, write_remote_code
from loopmoe.model.slots import Block, Slot, cache_index, every_slot


class DecoderLayer(nn.Module):
    """Attention + MoE sublayers; in the core, optionally modulated per iteration (IterAdaLN)."""

    def __init__(self, config: LoopMoEConfig, modulated: bool):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = SparseMoE(config)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        if config.norm_scheme == "pre":
            self.attn_out_norm = self.mlp_out_norm = None
        else:
            attn_gain = ffn_gain = 1.0
            if config.norm_scheme == "depth_scaled_sandwich":  # c / sqrt(L), L = executed depth
                root = math.sqrt(config.executed_depth())
                attn_gain, ffn_gain = SANDWICH_ATTN_GAIN / root, SANDWICH_FFN_GAIN / root
            self.attn_out_norm = RMSNorm(d, eps, init_gain=attn_gain)
            self.mlp_out_norm = RMSNorm(d, eps, init_gain=ffn_gain)
        self.modulation = Modulation(config) if modulated else None

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
        cache_slot: int,
        v_k: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        router_stats: bool = True,
        attend: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        # h: [B, S, d] -> [B, S, d]; v_k: [r] iteration signal (modulated core layers only);
        # cache_slot: the executed slot's KV-cache entry. Returns the MoE's RouterStats (its slot is
        # set by the caller), or None when router_stats is False. The layer never sees its Slot: under
        # torch.compile (``apply_compile``) the T runs of a core layer then share one compiled graph.
        # attend: what replaces the attention call, mapping the normed (and modulated) input to the
        # attention output; adaptive depth (``adaptive.py``) attends from the active tokens only.
        if self.modulation is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(h, v_k)  # scales/gates include the 1
        x = self.input_layernorm(h)
        if self.modulation is not None:
            x = torch.addcmul(shift1, x, scale1)  # x * (1 + γ1) + β1
        a = self.self_attn(x, rope, mask, cache, cache_slot) if attend is None else attend(x)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        h = h + (a * gate1 if self.modulation is not None else a)

        x = self.post_attention_layernorm(h)
        if self.modulation is not None:
            x = torch.addcmul(shift2, x, scale2)
        m, router = self.mlp(x, token_mask, router_stats)
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        h = h + (m * gate2 if self.modulation is not None else m)
        return h, router


class InjectionLinear(nn.Linear):
    """``h <- W [h; e]``, initialised to ``[I | 0]`` so that it starts as the plain loop."""


class ExitGate(nn.Linear):
    """Ouro's learned exit gate: each token's halting logit ``z_t = w · RMSNorm(h_t) + b`` after core iteration t,
    ``λ_t = sigmoid(z_t)`` its probability of stopping there (docs/design.md §5).

    It reads ``h_t``, the core's output after iteration t, before the coda: the state an exiting token
    carries into the coda, and the one at hand at the loop boundary where the exit is decided, so the
    gate costs one d-long dot product per active token there (reading the coda's or the head's output
    would run them at every iteration). The normalisation has no gain, which would be redundant with w
    (``w · (g ⊙ x) = (w ⊙ g) · x``): the gate reads the state's direction, not its norm, which grows
    over the iterations. Initialised to ``w = 0``, ``b = -log(T - 1)``: ``λ = 1/T`` for every token, so
    the first exit starts with the ``1/T`` a uniform prior gives it (exactly uniform at T = 2) and no
    depth is starved of gradient before the gate has learned anything.
    """

    def __init__(self, config: LoopMoEConfig):
        super().__init__(config.hidden_size, 1, bias=True)
        self.eps = config.rms_norm_eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., d] -> halting logits z: [...] fp32
        x = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), eps=self.eps).to(self.weight.dtype)
        return torch.nn.functional.linear(x, self.weight, self.bias).squeeze(-1).float()


@dataclass
class LoopMoEModelOutput(MoeModelOutputWithPast):
    """Adds the ``RouterStats`` of every executed MoE slot, in execution order."""

    router_stats: list[RouterStats] | None = None
    exit_loops: torch.Tensor | None = None  # [B, S] core iterations each token ran (adaptive depth only)
    # exit_readouts=True (the exit gate's training loss): iterations 1..T-1 read out through the coda and the
    # final norm, T-1 x [B, S, d] (iteration T's is last_hidden_state), and their halting logits [T-1, B, S].
    exit_readouts: tuple[torch.Tensor, ...] | None = None
    exit_gate_logits: torch.Tensor | None = None


@dataclass
class LoopMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """``loss`` = ``lm_loss`` + weighted aux and z losses; ``router_stats``: one per executed MoE slot."""

    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] | None = None
    exit_loops: torch.Tensor | None = None  # [B, S] core iterations each token ran (adaptive depth only)
    # The exit gate's training loss only (``exit_gate_objective``), each a detached fp32 tensor: the LM loss read
    # out after each iteration [T], the mean expected exit depth and the mean entropy of the exit distribution.
    loop_losses: torch.Tensor | None = None
    exit_depth: torch.Tensor | None = None
    exit_entropy: torch.Tensor | None = None


@dataclass
class ExitGateLoss:
    """``LoopMoEForCausalLM.exit_gate_objective``'s result: the objective (with gradient) and what it logs."""

    objective: torch.Tensor  # Σ_t p_t L_t - β H(p), per token, averaged
    loop_losses: torch.Tensor  # [T] L_t averaged over tokens, detached
    depth: torch.Tensor  # mean expected exit depth Σ_t t p_t, detached
    entropy: torch.Tensor  # mean H(p) in nats, detached


def refuse_attention_weights(output_attentions: bool | None, config: LoopMoEConfig) -> None:
    """``output_attentions=True`` (or the config's switch) is an error, not silently ignored: the fused
    attention kernels never form the weights (see ``LoopMoEPreTrainedModel.get_correct_attn_implementation``)."""
    if output_attentions or (output_attentions is None and getattr(config, "output_attentions", False)):
        raise ConfigError(
            "LoopMoE cannot return attention weights (output_attentions=True): its attention is a fused kernel "
            "(SDPA, flash or flex) that never materialises them; use output_hidden_states=True or router_stats "
            "for per-layer analysis"
        )


class LoopMoEPreTrainedModel(PreTrainedModel):
    config_class = LoopMoEConfig
    config: LoopMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # per executed slot; see LoopMoEModel.checkpoint_policy
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """transformers' choice of attention kernel, refusing ``"eager"``: every implementation here is a fused
        kernel (SDPA, flash, flex) that never forms the attention weights, so ``eager`` could only be SDPA
        under another name and ``output_attentions=True`` would have nothing to return."""
        if requested_attention is not None and requested_attention.removeprefix("paged|") == "eager":
            raise ConfigError(
                "LoopMoE has no eager attention (it never materialises the attention weights): use "
                'attn_implementation="sdpa" (the default), "flash_attention_2" or "flex_attention"'
            )
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' checkpoint, made self-contained: ``config.json`` gets an ``auto_map`` and the
        folder the model's modules (``remote_code.py``), so that plain transformers loads it with
        ``trust_remote_code=True``. loopmoe itself loads it with the installed classes (the folder's
        ``model_type`` is registered) and never runs the folder's code."""
        classes = {
            "AutoConfig": type(self.config),
            "AutoModel": LoopMoEModel,
            "AutoModelForCausalLM": LoopMoEForCausalLM,
        }
        if kwargs.get("is_main_process", True):  # the code first: push_to_hub uploads inside the save
            os.makedirs(save_directory, exist_ok=True)
            write_remote_code(save_directory, classes)
        had, previous = hasattr(self.config, "auto_map"), getattr(self.config, "auto_map", None)
        self.config.auto_map = auto_map(classes)  # written into config.json by the save, not kept on the config
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had:
                self.config.auto_map = previous
            else:
                del self.config.auto_map

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        cfg = self.config
        std = cfg.initializer_range
        if cfg.norm_scheme == "depth_scaled_sandwich":  # TinyInit: std = sqrt(1 / (2 d L))
            std = math.sqrt(1.0 / (2 * cfg.hidden_size * cfg.executed_depth()))
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, InjectionLinear):
            d = cfg.hidden_size
            init.copy_(module.weight, torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
        elif isinstance(module, ExitGate):  # λ = 1/T for every token (see ExitGate)
            init.zeros_(module.weight)
            init.constant_(module.bias, -math.log(cfg.num_loops - 1))
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, RMSNorm):
            init.constant_(module.weight, module.init_gain)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, RotaryEmbedding):
            dim = cfg.head_dim
            init.copy_(module.inv_freq, 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)))


class LoopMoEModel(LoopMoEPreTrainedModel):
    def __init__(self, config: LoopMoEConfig):
        super().__init__(config)
        d = config.hidden_size
        # No padding_idx: the pad token is usually EOS (loopmoe's exports, GPT-2, Qwen), whose embedding must
        # keep learning when the model is fine-tuned; padded positions are masked, not zeroed.
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        cond = config.conditioning
        self.prelude = nn.ModuleList(DecoderLayer(config, False) for _ in range(config.num_prelude_layers))
        self.core = nn.ModuleList(DecoderLayer(config, cond.modulates) for _ in range(config.num_core_layers))
        self.coda = nn.ModuleList(DecoderLayer(config, False) for _ in range(config.num_coda_layers))
        self.iter_encoder = IterationEncoder(config) if cond.uses_iteration else None  # v_k = MLP_iter(PE(k))
        self.iter_embedding = nn.Embedding(config.max_loops, d) if cond.embeds_iteration else None
        self.injection = InjectionLinear(2 * d, d, bias=False) if config.input_injection == "concat" else None
        self.exit_gate = ExitGate(config) if config.exit_gate else None
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # Activation checkpointing: which executed slots recompute their activations in backward.
        # Set by ``loopmoe.distributed.parallelize.apply_activation_checkpointing`` (or HF's
        # ``gradient_checkpointing_enable``); a slot, not a module, is the unit, because the core's
        # modules run T times and each run is its own region.
        self.checkpoint_policy: Callable[[Slot], bool] | None = None
        self.post_init()

    @property
    def gradient_checkpointing(self) -> bool:
        """transformers' switch: on means every executed slot is checkpointed."""
        return self.checkpoint_policy is not None

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        # transformers also hands over its checkpoint function (reentrant by default); the slots
        # always use the non-reentrant one, which keeps gradients flowing into the aux losses that
        # come out of a region inside RouterStats.
        self.checkpoint_policy = every_slot if enable else None

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self.iter_embedding:  # starts as the plain loop, like the other conditionings
            init.zeros_(module.weight)

    def slot(self, block: Block, layer: int, iteration: int | None = None, num_loops: int | None = None) -> Slot:
        """The executed slot of ``layer`` in ``block`` (at core ``iteration``) when the core runs ``num_loops`` times."""
        cfg = self.config
        loops = cfg.num_loops if num_loops is None else num_loops
        index = cache_index(
            block, layer, iteration or 0, prelude=cfg.num_prelude_layers, core=cfg.num_core_layers, loops=loops
        )
        return Slot(block, layer, iteration, index)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        num_loops: int | None = None,
        output_router_stats: bool = True,
        exit_policy: ExitPolicy | None = None,
        exit_loops: torch.Tensor | None = None,
        exit_logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        exit_readouts: bool = False,
        **kwargs,
    ) -> LoopMoEModelOutput:
        # exit_policy / exit_loops ([B, S] forced core iteration counts): adaptive depth (``adaptive.py``),
        # the core running each iteration on the tokens that have not exited; exit_logits_fn: the final norm
        # and LM head, which the kl and entropy criteria read. exit_readouts: also read every earlier
        # iteration out and return the exit gate's logits (the gate's training loss; whole sequences only).
        cfg = self.config
        refuse_attention_weights(kwargs.get("output_attentions"), cfg)
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("Pass exactly one of input_ids or inputs_embeds.")
        adaptive = exit_policy is not None or exit_loops is not None
        if exit_readouts:
            if self.exit_gate is None:
                raise ConfigError("exit readouts train a learned exit gate: this model has none (model.exit_gate=true)")
            if adaptive or use_cache or past_key_values is not None:
                raise ConfigError(
                    "the exit gate's training loss runs every iteration of whole sequences: drop the exit criterion "
                    "(exit_criterion / exit_loops), past_key_values and use_cache=True, or pass exit_gate_loss=False"
                )
            use_cache = False
        if adaptive:
            if self.training and torch.is_grad_enabled():
                raise ConfigError("early exit is an inference feature: call model.eval() (or torch.no_grad()) first")
            policy = (exit_policy if exit_policy is not None else ExitPolicy(max_loops=num_loops)).resolved(cfg)
            if policy.criterion in HEAD_CRITERIA and exit_logits_fn is None:
                raise ConfigError(f"the {policy.criterion!r} exit criterion reads the LM head: use LoopMoEForCausalLM")
            num_loops = policy.max_loops
        num_loops = cfg.num_loops if num_loops is None else num_loops
        cfg.check_num_loops(num_loops)
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if isinstance(past_key_values, DynamicCache) and past_key_values.layer_class_to_replicate is None:
            # generate() sizes the cache from the config's loop count; test-time depth may need more slots.
            while len(past_key_values.layers) < cfg.executed_depth(num_loops):
                past_key_values.layers.append(DynamicLayer())
        # A fixed-size cache (e.g. StaticCache) cannot grow: refuse a deeper run than it was sized for.
        fixed = past_key_values is not None and not isinstance(past_key_values, DynamicCache)
        slots = len(getattr(past_key_values, "layers", ())) if fixed else None
        if slots is not None and slots < cfg.executed_depth(num_loops):
            raise ConfigError(
                f"the KV cache ({type(past_key_values).__name__}) has {slots} layer slots, sized for "
                f"num_loops={cfg.num_loops}, but num_loops={num_loops} runs {cfg.executed_depth(num_loops)} layers: "
                "generate with the default dynamic cache (drop cache_implementation='static') for test-time depth, "
                f"or use num_loops <= {cfg.num_loops}"
            )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = create_causal_mask(
            config=cfg,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1] :].bool()

        h = inputs_embeds  # [B, S, d]
        rope = self.rotary_emb(h, position_ids)
        hidden_states = [h] if output_hidden_states else None
        routers: list[RouterStats] = []

        # Checkpointed slots recompute in backward; never while filling a KV cache (it would be filled twice).
        checkpointing = self.training and torch.is_grad_enabled() and past_key_values is None
        recompute = self.checkpoint_policy if checkpointing else None

        def run(
            layer: nn.Module,
            h: torch.Tensor,
            slot: Slot,
            v_k: torch.Tensor | None = None,
            cache: Cache | None = None,
            record: bool = True,
        ) -> torch.Tensor:
            # record=False (the exit readouts' extra coda runs): no router statistics, no hidden state kept.
            cache = past_key_values if cache is None else cache
            args = (h, rope, mask, cache, slot.cache_index, v_k, token_mask, output_router_stats and record)
            if recompute is not None and recompute(slot):
                h, router = checkpoint(layer, *args, use_reentrant=False)
            else:
                h, router = layer(*args)
            if router is not None:
                router.slot = slot
                routers.append(router)
            if hidden_states is not None and record:
                hidden_states.append(h)
            return h

        # Prelude: P layers, once.
        for i, layer in enumerate(self.prelude):
            h = run(layer, h, self.slot("prelude", i))
        # Core: the same C layers, T times.
        e = h  # the prelude's output, re-injected at every later iteration
        executed = None
        loop_states: list[torch.Tensor] | None = [] if exit_readouts else None  # h after iterations 1..T-1
        if adaptive:  # each iteration on the tokens that have not exited (adaptive.py)
            B, S = h.shape[:2]
            core = AdaptiveCore(
                model=self,
                policy=policy,
                exit_loops=exit_loops,
                logits_fn=exit_logits_fn,
                rope=rope,
                positions=position_ids.expand(B, S),
                key_padding=attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None,
                cache=past_key_values,
            )
            h, executed = core.run(h, run, e)
        for k in range(0 if adaptive else num_loops):
            if k > 0 and self.injection is not None:  # concat: h <- W [h; e]
                h = self.injection(torch.cat([h, e], dim=-1))
            elif k > 0 and cfg.input_injection == "add":
                h = h + e
            if self.iter_embedding is not None:  # iter_embedding ablation: h <- h + e_k
                h = h + self.iter_embedding.weight[k]
            v_k = self.iter_encoder(k, h) if self.iter_encoder is not None else None  # [r]
            for l, layer in enumerate(self.core):
                h = run(layer, h, self.slot("core", l, k, num_loops), v_k)
            if loop_states is not None and k < num_loops - 1:
                loop_states.append(h)
        # Coda: Q layers, once.
        for j, layer in enumerate(self.coda):
            h = run(layer, h, self.slot("coda", j, num_loops=num_loops))

        h = self.norm(h)
        readouts = gate_logits = None
        if loop_states is not None:  # what exiting after iteration t would give: its state through coda and norm
            assert self.exit_gate is not None
            empty = h.new_zeros(0, *h.shape[:2], dtype=torch.float32)  # T = 1: no earlier iteration
            gate_logits = torch.stack([self.exit_gate(s) for s in loop_states]) if loop_states else empty  # [T-1, B, S]
            states = []
            for state in loop_states:
                for j, layer in enumerate(self.coda):
                    state = run(layer, state, self.slot("coda", j, num_loops=num_loops), record=False)
                states.append(self.norm(state))
            readouts = tuple(states)
        return LoopMoEModelOutput(
            last_hidden_state=h,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            router_stats=routers if output_router_stats else None,
            exit_loops=executed,
            exit_readouts=readouts,
            exit_gate_logits=gate_logits,
        )


class LoopMoEForCausalLM(LoopMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LoopMoEConfig):
        super().__init__(config)
        self.model = LoopMoEModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_loops: int | None = None,
        output_router_stats: bool = True,
        skip_logits: bool | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        min_loops: int | None = None,
        max_loops: int | None = None,
        exit_loops: torch.Tensor | None = None,
        exit_gate_loss: bool | None = None,
        **kwargs,
    ) -> LoopMoECausalLMOutput:
        # output_router_stats=False (what generate() passes) skips the balancing losses and router
        # statistics of every MoE slot: aux_loss, z_loss and router_stats are then None.
        # skip_logits (default: training with labels) computes the loss fused with the LM head
        # (kernels/cross_entropy.py) and returns logits=None: the [B, S, V] logits are never materialised.
        # exit_gate_loss (default: training with labels, on a model with an exit gate): the loss is the exit
        # gate's objective (``exit_gate_objective``) and lm_loss the full-depth LM loss.
        cfg = self.config
        refuse_attention_weights(kwargs.get("output_attentions"), cfg)
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        if skip_logits and labels is None:
            raise ConfigError("skip_logits=True needs labels: without them the logits are the only output.")
        if exit_gate_loss is None:
            exit_gate_loss = self.training and labels is not None and self.model.exit_gate is not None
        if exit_gate_loss and labels is None:
            raise ConfigError("exit_gate_loss=True needs labels: the exit gate's loss weighs each iteration's LM loss")
        # Adaptive depth (``adaptive.py``): exit_criterion / exit_threshold, between min_loops and max_loops
        # (default: 1 and num_loops); exit_loops fixes each token's iteration count instead.
        policy = None
        if exit_criterion is not None or exit_threshold is not None or min_loops is not None or max_loops is not None:
            if exit_criterion is None and exit_loops is None:
                raise ConfigError("exit_threshold, min_loops and max_loops need an exit_criterion (e.g. 'latent')")
            policy = ExitPolicy(exit_criterion, exit_threshold or 0.0, min_loops or 1, max_loops or num_loops)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            num_loops=num_loops,
            output_router_stats=output_router_stats,
            exit_policy=policy,
            exit_loops=exit_loops,
            exit_logits_fn=lambda h: self.lm_head(self.model.norm(h)),
            exit_readouts=exit_gate_loss,
        )
        h = out.last_hidden_state
        if skip_logits:
            logits = None
        elif isinstance(logits_to_keep, int):
            logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep > 0 else h)
        else:
            logits = self.lm_head(h[:, logits_to_keep])

        routers = out.router_stats
        aux_loss = z_loss = None
        if routers is not None:  # mean over executed MoE slots
            aux_loss = torch.stack([r.aux_loss for r in routers]).mean()
            z_loss = torch.stack([r.z_loss for r in routers]).mean()
        lm_loss = loss = None
        gate: ExitGateLoss | None = None
        if exit_gate_loss:
            assert out.exit_readouts is not None and out.exit_gate_logits is not None and labels is not None
            gate = self.exit_gate_objective(h, out.exit_readouts, out.exit_gate_logits, labels, **kwargs)
            lm_loss = gate.loop_losses[-1]  # the full-depth LM loss, what evaluation reports
        elif labels is not None and skip_logits:
            lm_loss = linear_cross_entropy(
                h,
                self.lm_head.weight,
                labels,
                kwargs.get("num_items_in_batch"),
                kwargs.get("ignore_index", -100),
                kwargs.get("shift_labels"),
                kwargs.get("loss_chunk_bytes"),  # the planner's tracer sizes a GPU's chunks on the CPU
            )
        elif labels is not None:
            lm_loss = self.loss_function(logits, labels, cfg.vocab_size, **kwargs)
        if lm_loss is not None:
            loss = lm_loss if gate is None else gate.objective
            if aux_loss is not None and cfg.router_aux_loss_coef > 0:
                loss = loss + cfg.router_aux_loss_coef * aux_loss
            if z_loss is not None and cfg.router_z_loss_coef > 0:
                loss = loss + cfg.router_z_loss_coef * z_loss
        return LoopMoECausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            router_stats=routers,
            exit_loops=out.exit_loops,
            loop_losses=gate.loop_losses if gate is not None else None,
            exit_depth=gate.depth if gate is not None else None,
            exit_entropy=gate.entropy if gate is not None else None,
        )

    def exit_gate_objective(
        self,
        final: torch.Tensor,
        readouts: tuple[torch.Tensor, ...],
        gate_logits: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        loss_chunk_bytes: int | None = None,
        **_: object,
    ) -> ExitGateLoss:
        """Ouro's entropy-regularised expected loss of the learned exit gate (docs/design.md §5).

        With the exit distribution ``p_t = λ_t ∏_{s<t} (1 - λ_s)`` (t < T), ``p_T = ∏_{s<T} (1 - λ_s)``
        (``adaptive.exit_distribution``) and ``L_t`` the token's LM loss read out after iteration t (its
        state through the coda, the final norm and the LM head: what exiting there gives at inference),
        the objective is ``Σ_t p_t L_t - β H(p)`` per token, averaged over the counted tokens
        (``num_items_in_batch`` when given, as for the LM loss). The T readouts go through the chunked
        cross entropy as one stacked batch weighted by ``p``: no ``[T, B, S, V]`` logits, one ``[V, d]``
        weight gradient. Costs, against the plain loss: T LM-head passes instead of one, the coda T times,
        and the T readouts' activations.

        final: [B, S, d] iteration T's readout; readouts: T-1 x [B, S, d]; gate_logits: [T-1, B, S].
        """
        T = len(readouts) + 1
        log_p = exit_distribution(gate_logits)  # [T, B, S] fp32
        p = log_p.exp()
        targets = causal_targets(labels, shift_labels, ignore_index).to(final.device)  # [B*S]
        counted = (targets != ignore_index).float()
        items = counted.sum() if num_items_in_batch is None else num_items_in_batch
        denominator = torch.as_tensor(items, dtype=torch.float32, device=final.device)
        stacked = torch.cat([*readouts, final]) if readouts else final  # [T*B, S, d], iteration-major
        expected, row_losses = weighted_linear_cross_entropy(
            stacked, self.lm_head.weight, targets.repeat(T), p.reshape(-1), denominator, ignore_index, loss_chunk_bytes
        )
        entropy = -(p * log_p).sum(0).reshape(-1)  # [B*S] nats
        beta = self.config.exit_gate_beta
        assert beta is not None  # set whenever exit_gate is (LoopMoEConfig.validate)
        objective = expected - beta * (entropy * counted).sum() / denominator
        tokens = counted.sum().clamp_min(1)
        depth = torch.arange(1, T + 1, device=p.device, dtype=p.dtype)[:, None] * p.detach().reshape(T, -1)
        return ExitGateLoss(
            objective=objective,
            loop_losses=row_losses.view(T, -1).sum(1) / denominator,
            depth=(depth.sum(0) * counted).sum() / tokens,
            entropy=(entropy.detach() * counted).sum() / tokens,
        )

    # Loop settings a generation config may carry (``model.generation_config.num_loops = 4``, or a server's
    # per-request generation config): generate() hands them to every forward, as if passed to generate.
    GENERATION_CONFIG_FIELDS = ("num_loops", "exit_criterion", "exit_threshold", "min_loops", "max_loops")

    def _prepare_generation_config(self, generation_config, **kwargs):
        # transformers files a keyword the generation config also has under the config, not the forward:
        # hand the loop settings on to the forward either way.
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for name in self.GENERATION_CONFIG_FIELDS:
            value = getattr(generation_config, name, None)
            if value is not None and model_kwargs.get(name) is None:
                model_kwargs[name] = value
        return generation_config, model_kwargs

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # generate() never returns router statistics; skipping them saves ~20 small ops per MoE slot
        # and decoding step, a large share of batch-1 decoding time on CPU.
        inputs.setdefault("output_router_stats", False)
        return inputs

    # The trainer's step hooks (``loopmoe.training.trainer.StepHooks``): state that lives outside
    # autograd and changes once per optimizer step, here the aux-loss-free router biases.
    def on_optimizer_step(self, reduce_fn: Callable[[torch.Tensor], None] | None = None) -> None:
        """Aux-loss-free balancing step after an applied optimizer step.

        The expert counts of every router are concatenated so that a data-parallel run sums them
        with one ``reduce_fn`` call (an all-reduce) rather than one per layer.
        """
        rate = self.config.router_bias_update_rate
        if rate <= 0:
            return
        routers: list[TopKRouter] = [m for m in self.modules() if isinstance(m, TopKRouter)]
        counts = torch.cat([r.pending_counts for r in routers])  # [layers * E], a copy
        if reduce_fn is not None:
            reduce_fn(counts)
        for router, c in zip(routers, counts.split([r.num_experts for r in routers])):
            router.update_bias(rate, c)

    def on_skipped_step(self) -> None:
        """Forget the expert counts gathered since the last update: a skipped (non-finite) step's
        batch routes arbitrarily and must not steer the next bias update."""
        for module in self.modules():
            if isinstance(module, TopKRouter):
                module.pending_counts.zero_()
