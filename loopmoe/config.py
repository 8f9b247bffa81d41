"""One config class for LoopMoE and Vanilla MoE models.

A Vanilla MoE is ``LoopMoEConfig(num_loops=1, iter_conditioning="none")`` with every layer in the
core; a LoopMoE runs the core ``num_loops`` times between a prelude and a coda that run once.
The definitions are in ``docs/design.md`` (structure §1, IterAdaLN §2, norm schemes §3); every
architectural switch is a field here so that ablations are config changes, not code changes, and
what a switch *means* (which modules exist, what the budget counts) is decoded here once: see
``IterConditioning``.

The config validates itself on construction and raises ``ValueError`` naming the fix, so a bad
combination fails before any weight is allocated.
"""

from __future__ import annotations

import inspect
import math
from enum import StrEnum

from transformers import PretrainedConfig

from loopmoe.errors import ConfigError


class IterConditioning(StrEnum):
    """How the looped core is told which iteration it is running (docs/design.md §2).

    The config stores the plain string (it is JSON); every place that needs to know what a value
    implies asks these properties instead of comparing strings.
    """

    NONE = "none"
    ITER_EMBEDDING = "iter_embedding"  # h += e_k, a learned vector per iteration (up to max_loops)
    ADALN_ITER = "adaln_iter"  # modulation from v_k = MLP_iter(PE(k)) only
    ADALN_TOKEN = "adaln_token"  # modulation from u = W_h RMSNorm(h) only
    ITERADALN = "iteradaln"  # modulation from SiLU(v_k + u)

    @property
    def modulates(self) -> bool:
        """Core layers carry a ``Modulation`` (W_mod producing the six shift/scale/gate outputs)."""
        return self in (IterConditioning.ADALN_ITER, IterConditioning.ADALN_TOKEN, IterConditioning.ITERADALN)

    @property
    def uses_iteration(self) -> bool:
        """The modulation reads ``v_k = MLP_iter(PE(k))``: the model has one ``IterationEncoder``."""
        return self in (IterConditioning.ADALN_ITER, IterConditioning.ITERADALN)

    @property
    def uses_token(self) -> bool:
        """The modulation reads the token: ``W_h RMSNorm(h)``, per token and per executed core layer."""
        return self in (IterConditioning.ADALN_TOKEN, IterConditioning.ITERADALN)

    @property
    def embeds_iteration(self) -> bool:
        """A learned per-iteration vector is added to h (the table bounds the loop count)."""
        return self is IterConditioning.ITER_EMBEDDING


class ExpertType(StrEnum):
    """What a routed expert is, and at which width tokens reach it (docs/design.md §4).

    ``swiglu``: each expert is a SwiGLU ``d -> f -> d`` on the hidden state.
    ``dcca``: BigMac's descend-communicate-communicate-ascend layer (Jin et al., AAAI 2025): one
    descending projection ``d -> d_e`` per MoE layer before dispatch, experts that are SwiGLUs
    ``d_e -> f -> d_e`` at width ``d_e = dcca_dim`` (BigMac's r; ``r`` here is IterAdaLN's rank), the
    k expert outputs combined at width d_e, and one ascending projection ``d_e -> d`` after the
    combine. Token rows travel to and from the experts (the expert-parallel all_to_all) at width d_e
    instead of d.
    """

    SWIGLU = "swiglu"
    DCCA = "dcca"

    @property
    def projects(self) -> bool:
        """Each MoE layer carries the descending and ascending projections around its experts."""
        return self is ExpertType.DCCA


class DccaRouterInput(StrEnum):
    """Which vector the router of a DCCA layer scores: the full-width hidden state x (BigMac's choice:
    a wider input routes more accurately, and the router is cheap) or the descended x' = x W_desc^T."""

    HIDDEN = "hidden"
    DESCENDED = "descended"


class InputInjection(StrEnum):
    """How the prelude's output re-enters the core at later iterations (docs/design.md §2)."""

    NONE = "none"
    ADD = "add"
    CONCAT = "concat"


class NormScheme(StrEnum):
    """Pre-norm, sandwich norm, or Pangu Ultra's depth-scaled sandwich norm (docs/design.md §3)."""

    PRE = "pre"
    SANDWICH = "sandwich"
    DEPTH_SCALED_SANDWICH = "depth_scaled_sandwich"


class RouterScore(StrEnum):
    """The router's score function."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class MoEImplementation(StrEnum):
    """The expert kernel: ``auto`` picks grouped_mm where it is faster (docs/design.md §4)."""

    AUTO = "auto"
    LOOP = "loop"
    GROUPED_MM = "grouped_mm"


# The one table of LoopMoEConfig's string-choice fields: validate() checks membership from it, and
# `model.KEY=VALUE` overrides read `none` as the choice "none" (not Python None) where it is one.
CHOICE_FIELDS: dict[str, type[StrEnum]] = {
    "router_score": RouterScore,
    "expert_type": ExpertType,
    "dcca_router_input": DccaRouterInput,
    "moe_implementation": MoEImplementation,
    "iter_conditioning": IterConditioning,
    "input_injection": InputInjection,
    "norm_scheme": NormScheme,
}


def choice_values(choices: type[StrEnum]) -> tuple[str, ...]:
    """The spellings of a choice set, in declaration order (for messages and argparse)."""
    return tuple(member.value for member in choices)


def layers_text(cfg) -> str:
    """``P+CxT+Q`` for a LoopMoEConfig or any object with its layer fields (a search candidate)."""
    return f"{cfg.num_prelude_layers}+{cfg.num_core_layers}x{cfg.num_loops}+{cfg.num_coda_layers}"


def expert_width(cfg) -> int:
    """Width of the rows the routed experts take and return (and that an all_to_all carries):
    ``dcca_dim`` (d_e) for DCCA experts, ``hidden_size`` (d) otherwise. ``cfg``: a LoopMoEConfig or
    any object with its fields (the balancing search scores plain namespaces)."""
    return cfg.dcca_dim if ExpertType(cfg.expert_type).projects else cfg.hidden_size


def router_width(cfg) -> int:
    """Width of the vector the router scores: d_e for a DCCA layer routing on the descended vector, else d."""
    descended = ExpertType(cfg.expert_type).projects and cfg.dcca_router_input == "descended"
    return cfg.dcca_dim if descended else cfg.hidden_size


# Default entropy weight of the exit gate's training loss: the low end of Ouro's 0.05-0.1, enough to keep
# the exit distribution from collapsing onto one depth early in training (docs/design.md §5).
EXIT_GATE_BETA = 0.05

# TinyInit gains of the depth-scaled sandwich norm (Pangu Ultra): post-norm gain = c / sqrt(L).
SANDWICH_ATTN_GAIN = 0.283
SANDWICH_FFN_GAIN = 0.432


class LoopMoEConfig(PretrainedConfig):
    r"""Configuration of a looped (or, with ``num_loops=1``, vanilla) Mixture-of-Experts decoder.

    Structure: embedding -> prelude (``num_prelude_layers``, run once) -> core
    (``num_core_layers``, run ``num_loops`` times with shared weights) -> coda
    (``num_coda_layers``, run once) -> final RMSNorm -> LM head.
    Executed depth ``L = P + C * T + Q``; one KV-cache slot per executed layer.

    Args:  (one entry per field: ``loopmoe train --help`` lists them as ``--model.KEY``)
        vocab_size: vocabulary size (a training run takes its tokenizer's).
        hidden_size: model width ``d``.
        num_prelude_layers: ``P``, layers run once before the looped core.
        num_core_layers: ``C``, layers of the looped core (shared weights).
        num_coda_layers: ``Q``, layers run once after the looped core.
        num_loops: ``T``, times the core runs (1: a Vanilla MoE).
        num_attention_heads: query heads ``H``.
        num_key_value_heads: key/value heads ``H_kv`` (GQA; divides ``H``).
        head_dim: width of one attention head ``h_d``.
        qk_norm: RMSNorm over the head dimension of queries and keys (Qwen3 style).
        rope_theta: rotary embedding base.
        max_position_embeddings: the longest position (context length) the model is built for.
        num_experts: routed experts per MoE layer ``E``.
        num_experts_per_tok: experts each token is routed to (top-``k``).
        moe_intermediate_size: hidden size ``f`` of one routed expert.
        shared_expert_intermediate_size: total hidden size ``f_s`` of always-on shared experts (0: none).
        router_score: ``"softmax"`` or ``"sigmoid"`` scores over experts.
        norm_topk_prob: renormalise the selected top-k scores to sum to one.
        router_aux_loss_coef: weight of the switch-style load-balancing loss (per layer and iteration).
        router_z_loss_coef: weight of the router z-loss.
        router_bias_update_rate: step size of auxiliary-loss-free bias balancing (0 disables it).
        expert_type: ``"swiglu"`` (experts at the model width) or ``"dcca"`` (BigMac's low-dimension
            experts: see ``ExpertType``).
        dcca_dim: width ``d_e`` of DCCA experts, ``0 < d_e < hidden_size``; defaults to ``hidden_size // 4``
            (BigMac's downscaling factor 0.25) for ``dcca``; must stay unset for ``swiglu``.
        dcca_router_input: ``"hidden"`` (route on the full-width x, BigMac's choice) or ``"descended"``
            (route on the d_e-wide x' the experts see); ``dcca`` only.
        moe_implementation: ``"loop"`` (sorted tokens, one matmul per expert group; CPU),
            ``"grouped_mm"`` (one grouped GEMM per projection; CUDA) or ``"auto"``.
        iter_conditioning: one of ``none``, ``iter_embedding``, ``adaln_iter``, ``adaln_token``,
            ``iteradaln``. Defaults to ``iteradaln`` when ``num_loops > 1`` and ``none`` otherwise.
        iter_cond_rank: width ``r`` of the IterAdaLN signal (``W_h`` rank and ``MLP_iter`` width);
            defaults to ``max(16, hidden_size // 16)``.
        iter_pe_dim: size of the sinusoidal encoding ``PE(k)`` of the iteration index.
        max_loops: largest loop count an ``iter_embedding`` table holds (test-time depth limit for it).
        input_injection: re-inject the prelude output at each later core iteration:
            ``none``, ``add`` or ``concat`` (Huginn-style concat + linear).
        norm_scheme: ``pre``, ``sandwich`` or ``depth_scaled_sandwich`` (with TinyInit).
        exit_gate: a learned exit gate (Ouro's): a per-token halting probability after each core
            iteration, trained with the entropy-regularised expected loss over exit depths and read by
            the ``gate`` exit criterion at inference (docs/design.md §5); needs ``num_loops > 1``.
        exit_gate_beta: entropy weight ``beta`` of the exit gate's training loss (``exit_gate`` only);
            defaults to 0.05 with ``exit_gate`` (Ouro uses 0.05-0.1).
        rms_norm_eps: epsilon of every RMSNorm.
        initializer_range: standard deviation of the normal initialisation of the weights.
        tie_word_embeddings: share the input embedding and the LM head.
        use_cache: return a KV cache at inference (a training-mode forward builds none unless asked to).
        pad_token_id: padding token id (a training run takes its tokenizer's).
        bos_token_id: beginning-of-sequence token id (a training run takes its tokenizer's).
        eos_token_id: end-of-sequence token id (a training run takes its tokenizer's).
    """

    model_type = "loopmoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_prelude_layers: int = 0,
        num_core_layers: int = 8,
        num_coda_layers: int = 0,
        num_loops: int = 1,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 8,
        head_dim: int = 64,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 1024,
        shared_expert_intermediate_size: int = 0,
        router_score: str = "softmax",
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.001,
        router_z_loss_coef: float = 0.0,
        router_bias_update_rate: float = 0.0,
        expert_type: str = "swiglu",
        dcca_dim: int | None = None,
        dcca_router_input: str = "hidden",
        moe_implementation: str = "auto",
        iter_conditioning: str | None = None,
        iter_cond_rank: int | None = None,
        iter_pe_dim: int = 64,
        max_loops: int = 16,
        input_injection: str = "none",
        norm_scheme: str = "pre",
        exit_gate: bool = False,
        exit_gate_beta: float | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_prelude_layers = num_prelude_layers
        self.num_core_layers = num_core_layers
        self.num_coda_layers = num_coda_layers
        self.num_loops = num_loops
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.router_score = router_score
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_bias_update_rate = router_bias_update_rate
        self.expert_type = expert_type
        if dcca_dim is None and expert_type == ExpertType.DCCA:
            dcca_dim = hidden_size // 4  # BigMac's d_e = d / 4 (its GPT3-XL setting: 2048 -> 512)
        self.dcca_dim = dcca_dim
        self.dcca_router_input = dcca_router_input
        self.moe_implementation = moe_implementation
        if iter_conditioning is None:
            iter_conditioning = "iteradaln" if num_loops > 1 else "none"
        self.iter_conditioning = iter_conditioning
        if iter_cond_rank is None:
            # The modulation costs ~7*d*r parameters and FLOPs per core layer: a rank that scales with
            # the width keeps it a few percent of the layer at any size.
            iter_cond_rank = max(16, hidden_size // 16)
        self.iter_cond_rank = iter_cond_rank
        self.iter_pe_dim = iter_pe_dim
        self.max_loops = max_loops
        self.input_injection = input_injection
        self.norm_scheme = norm_scheme
        self.exit_gate = exit_gate
        if exit_gate_beta is None and exit_gate is True:
            exit_gate_beta = EXIT_GATE_BETA
        self.exit_gate_beta = exit_gate_beta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # transformers reads these generic names (cache sizing, rope utilities, pipelines).
        self.num_hidden_layers = self.executed_depth()
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        kwargs.setdefault("attn_implementation", "sdpa")
        self.validate()  # before transformers' own checks, whose messages do not name our fields' fixes
        super().__init__(  # type: ignore[call-arg]  # transformers' signature omits the token ids it takes
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------
    def executed_depth(self, num_loops: int | None = None) -> int:
        """Layers a token passes through: ``P + C * T + Q`` (``T`` defaults to ``num_loops``)."""
        loops = self.num_loops if num_loops is None else num_loops
        return self.num_prelude_layers + self.num_core_layers * loops + self.num_coda_layers

    @property
    def unique_layers(self) -> int:
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def conditioning(self) -> IterConditioning:
        """``iter_conditioning`` as an ``IterConditioning``: what the setting implies."""
        return IterConditioning(self.iter_conditioning)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for any invalid combination."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"LoopMoEConfig: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_core_layers",
            "num_loops",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "max_position_embeddings",
            "iter_cond_rank",
            "iter_pe_dim",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        for name in ("num_prelude_layers", "num_coda_layers", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
            f"({self.num_key_value_heads}); pick num_key_value_heads from its divisors",
        )
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(
            self.num_experts_per_tok <= self.num_experts,
            f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})",
        )
        for name, choices in CHOICE_FIELDS.items():
            need(
                getattr(self, name) in choice_values(choices),
                f"{name} must be one of {choice_values(choices)}, got {getattr(self, name)!r}",
            )
        if ExpertType(self.expert_type).projects:
            d_e = self.dcca_dim
            need(
                isinstance(d_e, int) and not isinstance(d_e, bool) and 0 < d_e < self.hidden_size,
                f"dcca_dim (the width d_e of DCCA experts) must be a whole number with 0 < d_e < hidden_size "
                f"({self.hidden_size}), got {d_e!r}; BigMac uses d_e = hidden_size // 4 = {self.hidden_size // 4}, "
                f"the default when dcca_dim is unset",
            )
        else:
            need(
                self.dcca_dim is None,
                f"dcca_dim={self.dcca_dim!r} sets the width of DCCA experts, but expert_type={self.expert_type!r}: "
                f"set expert_type='dcca', or drop dcca_dim",
            )
            need(
                self.dcca_router_input == "hidden",
                f"dcca_router_input={self.dcca_router_input!r} only applies to expert_type='dcca': set "
                f"expert_type='dcca', or drop dcca_router_input",
            )
        need(self.iter_pe_dim % 2 == 0, f"iter_pe_dim must be even (sin/cos pairs), got {self.iter_pe_dim}")
        need(
            not self.conditioning.embeds_iteration or self.num_loops <= self.max_loops,
            f"num_loops ({self.num_loops}) exceeds max_loops ({self.max_loops}) of the iter_embedding table; "
            f"raise max_loops",
        )
        need(
            self.input_injection == "none" or self.num_loops > 1,
            f"input_injection={self.input_injection!r} needs num_loops > 1 (it re-injects at later iterations); "
            f"set input_injection='none' for a non-looped model",
        )
        need(
            isinstance(self.exit_gate, bool),
            f"exit_gate must be true or false, got {self.exit_gate!r}",
        )
        need(
            not self.exit_gate or self.num_loops > 1,
            f"exit_gate=True needs a looped model (num_loops > 1, got {self.num_loops}): a gate chooses among "
            "core iterations; raise num_loops or drop exit_gate",
        )
        if self.exit_gate:
            beta = self.exit_gate_beta
            need(
                isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta >= 0,
                f"exit_gate_beta (the entropy weight of the exit gate's loss) must be a finite number >= 0, "
                f"got {beta!r}; Ouro uses 0.05-0.1 (default {EXIT_GATE_BETA})",
            )
        else:
            need(
                self.exit_gate_beta is None,
                f"exit_gate_beta={self.exit_gate_beta!r} weights the exit gate's loss, but exit_gate is off: set "
                "exit_gate=True, or drop exit_gate_beta",
            )
        for name in (
            "rope_theta",
            "rms_norm_eps",
            "initializer_range",
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "router_bias_update_rate",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                f"{name} must be a finite number, got {value!r}",
            )
        for name in ("rope_theta", "rms_norm_eps"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("initializer_range", "router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")

    def check_num_loops(self, num_loops: int) -> None:
        """Validate a loop count requested at inference (test-time depth)."""
        if not isinstance(num_loops, int) or num_loops < 1:
            raise ConfigError(f"num_loops must be a positive integer, got {num_loops!r}")
        if self.conditioning.embeds_iteration and num_loops > self.max_loops:
            raise ConfigError(
                f"num_loops={num_loops} exceeds max_loops={self.max_loops}: the iter_embedding ablation has one "
                f"learned vector per iteration. Use at most {self.max_loops} loops, or a model trained with "
                f"iter_conditioning='iteradaln' (sinusoidal, any depth)."
            )

    def architecture_dict(self) -> dict:
        """The fields that define the architecture (``ARCHITECTURE_FIELDS``), for tables and JSON."""
        return {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}


# Every argument of LoopMoEConfig, in signature order: the one list of the config's fields.
CONFIG_FIELDS: tuple[str, ...] = tuple(
    name
    for name, param in inspect.signature(LoopMoEConfig.__init__).parameters.items()
    if name != "self" and param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
)
# Fields that do not change what the model computes: the kernel choice, cache use and token ids.
_RUNTIME_FIELDS = ("moe_implementation", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id")
# The fields that define the architecture: two configs equal on these build the same model.
ARCHITECTURE_FIELDS: tuple[str, ...] = tuple(f for f in CONFIG_FIELDS if f not in _RUNTIME_FIELDS)


def config_field_help() -> dict[str, str]:
    """The meaning of each ``CONFIG_FIELDS`` entry, read from the ``Args:`` section of ``LoopMoEConfig``'s
    docstring (its one written home): an entry ``a, b: text`` (continued on deeper-indented lines)
    documents both ``a`` and ``b``. ``loopmoe train --help`` lists the ``model.KEY`` flags with it."""
    doc = inspect.cleandoc(LoopMoEConfig.__doc__ or "")
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    entries: list[tuple[list[str], list[str]]] = []
    for line in args.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        head, sep, text = line.strip().partition(": ")
        names = [n.strip() for n in head.split(",")]
        if indent == 4 and sep and all(n in CONFIG_FIELDS for n in names):
            entries.append((names, [text]))
        elif entries:
            entries[-1][1].append(line.strip())
    return {name: " ".join(text) for names, text in entries for name in names}
