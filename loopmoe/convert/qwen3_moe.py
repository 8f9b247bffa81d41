"""Qwen3-MoE (transformers) <-> LoopMoE checkpoints: the one home of the mapping between the two.

A Vanilla MoE in LoopMoE with pre-norm, softmax top-k routing, QK-norm, GQA and RoPE is the
Qwen3-MoE architecture. A looped LoopMoE whose core layers cannot tell iterations apart (no
iteration conditioning, no re-injection of the prelude output) is one too, unrolled: its
executed layers ``P + C * T + Q`` become Qwen3-MoE's ``num_hidden_layers``, each core layer's
weights copied to its T positions. Everything else maps one to one:

- the config fields in ``_SAME_FIELDS`` (and RoPE's theta, nested in ``rope_parameters``);
- weights: ``model.layers.n.`` <-> the n-th executed layer (``layer_prefixes``), the same names
  below that, except the experts: Qwen3-MoE checkpoints store each expert's
  ``gate_proj / up_proj / down_proj`` (what vLLM, SGLang and llama.cpp read), LoopMoE one
  ``[E, 2f, d]`` gate-up and one ``[E, d, f]`` down tensor per layer.

``convert_qwen3_moe`` imports (T = 1), ``export_qwen3_moe`` exports, refusing a model it cannot
express exactly with every reason named (``qwen3_moe_blockers``). Weights are read with safetensors
(or ``torch.load(weights_only=True)`` for ``.bin`` files): nothing in a source folder is executed.
"""

from __future__ import annotations

import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loopmoe.atomic import atomic_directory, check_no_overlap
from loopmoe.budget import compute_budget
from loopmoe.config import ExpertType, LoopMoEConfig
from loopmoe.errors import CheckpointError, ConfigError, LoopMoEError, MissingFileError
from loopmoe.model import LoopMoEForCausalLM
from loopmoe.trust import check_safetensors, pickle_refusal, read_json, refuse_mismatched_weights, unreadable_weights

# Copied from the source folder beside the converted weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)

# Config fields with the same name and meaning in both architectures.
_SAME_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "rms_norm_eps",
    "initializer_range",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def layer_prefixes(config: LoopMoEConfig) -> list[str]:
    """LoopMoE's weight prefix of each executed layer, in order: index n is Qwen3-MoE's ``model.layers.n.``."""
    return [
        *(f"model.prelude.{i}." for i in range(config.num_prelude_layers)),
        *(f"model.core.{i}." for _ in range(config.num_loops) for i in range(config.num_core_layers)),
        *(f"model.coda.{i}." for i in range(config.num_coda_layers)),
    ]


# --- Qwen3-MoE -> LoopMoE ------------------------------------------------------------------------


def loopmoe_config_from_qwen3_moe(qwen: dict) -> LoopMoEConfig:
    """Map a Qwen3-MoE ``config.json`` dict onto an equivalent LoopMoEConfig (T = 1, no conditioning)."""
    if qwen.get("model_type") != "qwen3_moe":
        raise CheckpointError(f"expected a Qwen3-MoE config (model_type 'qwen3_moe'), got {qwen.get('model_type')!r}")
    unsupported = {
        "mlp_only_layers": (qwen.get("mlp_only_layers") or []) != [],
        "decoder_sparse_step": qwen.get("decoder_sparse_step", 1) != 1,
        "use_sliding_window": bool(qwen.get("use_sliding_window")),
        "attention_bias": bool(qwen.get("attention_bias")),
        "hidden_act": qwen.get("hidden_act", "silu") != "silu",
        "rope_parameters.rope_type": (qwen.get("rope_parameters") or {}).get("rope_type", "default") != "default",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(
            f"this Qwen3-MoE checkpoint uses features LoopMoE does not model: {', '.join(bad)}. Only all-MoE "
            f"layers (mlp_only_layers=[], decoder_sparse_step=1), full attention without bias, SiLU experts and "
            f"default RoPE convert exactly."
        )
    rope = qwen.get("rope_parameters") or {}
    num_experts = qwen.get("num_experts", qwen.get("num_local_experts"))
    if num_experts is None:
        raise CheckpointError("this Qwen3-MoE config has no num_experts (nor num_local_experts): not an MoE checkpoint")
    defaults = {"max_position_embeddings": 4096, "norm_topk_prob": False, "router_aux_loss_coef": 0.001}
    same: dict[str, Any] = {
        name: qwen.get(name, defaults.get(name)) for name in _SAME_FIELDS if name in qwen or name in defaults
    }
    return LoopMoEConfig(
        **same,
        num_core_layers=qwen["num_hidden_layers"],
        num_loops=1,
        iter_conditioning="none",
        head_dim=qwen.get("head_dim") or qwen["hidden_size"] // qwen["num_attention_heads"],
        qk_norm=True,
        rope_theta=rope.get("rope_theta", qwen.get("rope_theta", 10000.0)),
        num_experts=num_experts,
        router_score="softmax",
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint folder, without executing anything from it."""
    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        check_safetensors(file)  # a torn file or a header larger than the file: named, before safetensors reads it
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 -- safe_open objects are not iterable: keys() is the listing
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors' own errors: a corrupt header or dtype
            raise unreadable_weights(file, e) from None
    if not files:
        for file in sorted(folder.glob("pytorch_model*.bin")):
            try:  # weights_only: torch's restricted unpickler, which runs no code from the file
                loaded = torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise pickle_refusal(file, e) from None
            except (RuntimeError, EOFError, ValueError) as e:  # a torn zip or pickle: torch's reader errors
                raise unreadable_weights(file, e) from None
            if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
                raise CheckpointError(f"{file} holds no mapping of names to tensors; copy or export the model again")
            tensors.update(loaded)
    if not tensors:
        raise MissingFileError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    return tensors


def qwen3_moe_state_dict_to_loopmoe(qwen_sd: dict[str, torch.Tensor], config: LoopMoEConfig) -> dict[str, torch.Tensor]:
    """Rename layers to the core and fuse per-expert weights into ``[E, 2f, d]`` / ``[E, d, f]`` tensors."""
    prefixes = layer_prefixes(config)
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[int, int, str], torch.Tensor] = {}
    for key, value in qwen_sd.items():
        expert, in_layer = _EXPERT_KEY.match(key), _LAYER_KEY.match(key)
        if expert:
            per_expert[(int(expert.group(1)), int(expert.group(2)), expert.group(3))] = value
        elif in_layer and int(in_layer.group(1)) < len(prefixes):
            out[prefixes[int(in_layer.group(1))] + in_layer.group(2)] = value
        else:
            out[key] = value  # embedding, final norm, LM head (a layer out of range is reported as unexpected)
    for layer in sorted({k[0] for k in per_expert}):
        try:
            weights = {p: [per_expert[(layer, e, p)] for e in range(config.num_experts)] for p in _PROJECTIONS}
        except KeyError as missing:
            raise CheckpointError(f"layer {layer}: expert weight {missing} is missing from the checkpoint") from None
        prefix = prefixes[layer] + "mlp.experts."
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat(gu) for gu in zip(weights["gate_proj"], weights["up_proj"])]
        )
        out[prefix + "down_proj"] = torch.stack(weights["down_proj"])
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def convert_qwen3_moe(
    src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, *, overwrite: bool = False
) -> Path:
    """Convert the Qwen3-MoE checkpoint folder ``src`` into a LoopMoE checkpoint folder ``dst``.

    ``dst`` follows ``loopmoe.atomic``'s rule: never ``src`` or inside it, and a folder loopmoe did not
    write is refused unless ``overwrite`` (then moved aside, kept).
    """
    src, dst = Path(src), Path(dst)
    check_no_overlap(dst, {"source checkpoint": src}, flag="DST")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} not found: pass a transformers Qwen3-MoE checkpoint directory")
    config = loopmoe_config_from_qwen3_moe(read_json(config_path, CheckpointError, "pass a Qwen3-MoE checkpoint"))
    state = qwen3_moe_state_dict_to_loopmoe(read_weights(src), config)
    check_size(config, state, src)
    check_finite(state, src)
    model = LoopMoEForCausalLM(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(k for k in expected - set(state) if not k.endswith("expert_bias"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the Qwen3-MoE layout: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    check_shapes(state, {k: v for k, v in model.state_dict().items() if k in expected}, src)
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)  # type: ignore[arg-type]  # transformers: .to is typed as wraps(nn.Module.to), its self as the first argument
    with _output(dst, overwrite, "DST") as staging:
        model.save_pretrained(staging)
        _copy_tokenizer(src, staging)  # after the save: the source's generation_config.json wins
    return dst


# --- LoopMoE -> Qwen3-MoE ------------------------------------------------------------------------


def qwen3_moe_blockers(config: LoopMoEConfig, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Why Qwen3-MoE cannot compute exactly what this LoopMoE computes (empty: it can).

    ``state``: the model's weights, for what the config alone does not say (a learned router bias).
    """
    reasons = []
    if config.iter_conditioning != "none":
        reasons.append(
            f"iteration conditioning (iter_conditioning={config.iter_conditioning!r}): the unrolled copies of a "
            "core layer would have to compute different functions"
        )
    if config.input_injection != "none":
        reasons.append(f"re-injection of the prelude output (input_injection={config.input_injection!r})")
    if config.norm_scheme != "pre":
        reasons.append(f"sandwich norms (norm_scheme={config.norm_scheme!r}): Qwen3-MoE is pre-norm only")
    if config.router_score != "softmax":
        reasons.append(f"{config.router_score} routing scores: Qwen3-MoE routes by softmax")
    if config.shared_expert_intermediate_size:
        reasons.append(
            f"shared experts (shared_expert_intermediate_size={config.shared_expert_intermediate_size}): "
            "Qwen3-MoE has none"
        )
    if not config.qk_norm:
        reasons.append("no QK-norm (qk_norm=False): Qwen3-MoE always normalises queries and keys")
    if ExpertType(config.expert_type).projects:
        reasons.append(
            f"DCCA experts (expert_type={config.expert_type!r}, width {config.dcca_dim}, with the MoE layer's "
            "descending and ascending projections): Qwen3-MoE experts work at the model width"
        )
    if config.exit_gate:
        reasons.append(
            "a learned exit gate (exit_gate=True): Qwen3-MoE has no per-token early exit, so the copy would drop the "
            "gate and the adaptive depth it was trained for"
        )
    biased = sorted(k for k, v in (state or {}).items() if k.endswith("mlp.gate.expert_bias") and v.any())
    if biased:
        reasons.append(
            f"a learned router selection bias (aux-loss-free balancing, {biased[0]} and {len(biased) - 1} more "
            "non-zero): Qwen3-MoE selects experts by score alone"
        )
    return reasons


def qwen3_moe_config_from_loopmoe(config: LoopMoEConfig) -> dict:
    """``Qwen3MoeConfig`` arguments of ``config`` unrolled (``num_hidden_layers`` = executed depth)."""
    depth = config.executed_depth()
    return {
        **{name: getattr(config, name) for name in _SAME_FIELDS},
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_hidden_layers": depth,
        "head_dim": config.head_dim,
        "num_experts": config.num_experts,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "intermediate_size": config.moe_intermediate_size,  # dense MLP size: unused, every layer is MoE
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "use_sliding_window": False,
        "max_window_layers": depth,
    }


def loopmoe_state_dict_to_qwen3_moe(state: dict[str, torch.Tensor], config: LoopMoEConfig) -> dict[str, torch.Tensor]:
    """Unroll: copy each executed layer's weights to its ``model.layers.n.`` and split the experts per expert.

    Every tensor is its own copy (a core layer's weights appear T times; safetensors stores no aliases).
    """
    out: dict[str, torch.Tensor] = {}
    for n, prefix in enumerate(layer_prefixes(config)):
        for key, value in state.items():
            if not key.startswith(prefix) or key.endswith("mlp.gate.expert_bias"):
                continue
            name = key[len(prefix) :]
            if name == "mlp.experts.gate_up_proj":  # [E, 2f, d], gate rows first
                f = value.shape[1] // 2
                for e in range(value.shape[0]):
                    out[f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight"] = value[e, :f].clone()
                    out[f"model.layers.{n}.mlp.experts.{e}.up_proj.weight"] = value[e, f:].clone()
            elif name == "mlp.experts.down_proj":
                for e, down in enumerate(value.unbind(0)):
                    out[f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"] = down.clone()
            else:
                out[f"model.layers.{n}.{name}"] = value.clone()
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if key in state and not (key == "lm_head.weight" and config.tie_word_embeddings):
            out[key] = state[key].clone()
    return out


def export_qwen3_moe(
    src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, *, overwrite: bool = False
) -> Path:
    """Write the LoopMoE checkpoint folder ``src`` as a Qwen3-MoE checkpoint folder ``dst`` (unrolled).

    Raises ``CheckpointError`` naming every reason when Qwen3-MoE cannot express the model exactly,
    and when ``src``'s weights do not match its config (a missing or wrongly shaped tensor). ``dst``
    follows ``loopmoe.atomic``'s rule (see ``convert_qwen3_moe``).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import Qwen3MoeConfig

    src, dst = Path(src), Path(dst)
    check_no_overlap(dst, {"LoopMoE checkpoint": src})
    config_path = src / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} not found: pass a LoopMoE checkpoint directory")
    raw = read_json(config_path, CheckpointError, "pass a LoopMoE checkpoint")
    if raw.get("model_type") != "loopmoe":
        raise CheckpointError(f"{src} is not a LoopMoE checkpoint (model_type {raw.get('model_type')!r})")
    config = LoopMoEConfig.from_dict({k: v for k, v in raw.items() if k != "auto_map"})
    state = read_weights(src)
    with torch.device("meta"):
        expected = LoopMoEForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    check_shapes(state, expected, src)
    check_finite(state, src)
    blockers = qwen3_moe_blockers(config, state)
    if blockers:
        raise CheckpointError(
            f"{src} cannot be written as Qwen3-MoE exactly: {'; '.join(blockers)}. Qwen3-MoE expresses a T = 1 "
            "LoopMoE and a looped one without iteration conditioning or re-injection (unrolled)"
        )
    check_room(unrolled_bytes(state, config, dtype), dst)
    qwen_state = loopmoe_state_dict_to_qwen3_moe(state, config)
    if dtype is not None:
        qwen_state = {k: v.to(dtype) for k, v in qwen_state.items()}
    qwen_config = Qwen3MoeConfig(**qwen3_moe_config_from_loopmoe(config), dtype=next(iter(qwen_state.values())).dtype)
    with _output(dst, overwrite, "OUT") as staging:
        qwen_config.save_pretrained(staging)
        save_torch_state_dict(qwen_state, staging)
        _copy_tokenizer(src, staging)
    return dst


@contextmanager
def _output(dst: Path, overwrite: bool, flag: str) -> Iterator[Path]:
    """``atomic_directory(dst)``, with an OS error of the write (a folder that cannot be created, a full
    disk, a read-only file system) named in one line; ``dst`` stays as it was."""
    try:
        with atomic_directory(dst, overwrite=overwrite) as staging:
            yield staging
    except LoopMoEError:
        raise
    except OSError as e:
        raise ConfigError(
            f"cannot write {dst}: {e.strerror or e}; nothing was written there. Choose "
            f"another {flag} on a disk you can write, with room for the checkpoint"
        ) from e


def unrolled_bytes(state: dict[str, torch.Tensor], config: LoopMoEConfig, dtype: torch.dtype | None = None) -> int:
    """Bytes of the Qwen3-MoE weights ``state`` unrolls into: the core's tensors ``num_loops`` times, the rest once."""

    def size(t: torch.Tensor) -> int:
        return t.numel() * (torch.empty((), dtype=dtype).element_size() if dtype is not None else t.element_size())

    core = sum(size(v) for k, v in state.items() if k.startswith("model.core."))
    return sum(size(v) for k, v in state.items() if not k.startswith("model.core.")) + core * config.num_loops


def check_room(needed: int, dst: Path) -> None:
    """Refuse an export whose unrolled weights would not fit the destination's disk or this machine's
    memory (they are built in memory, then written): say so before building a list of 10^8 layers."""
    folder = Path(dst).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    disk = shutil.disk_usage(folder)
    free = disk.free if disk.total else None  # a pseudo file system (/proc) reports 0 of 0: its write fails, named
    available = _available_memory()
    for what, room, fix in (
        (f"free on the disk of {folder}", free, "free space, or choose another OUT"),
        ("of available memory (the unrolled weights are built in memory)", available, "use a larger machine"),
    ):
        if room is not None and needed > room:
            raise CheckpointError(
                f"the unrolled Qwen3-MoE checkpoint would take {needed / 2**30:,.2f} GiB (num_loops copies of the "
                f"core's weights) but only {room / 2**30:,.2f} GiB are {what}: {fix}, or export a model with fewer "
                "loops"
            )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_finite(state: dict[str, torch.Tensor], src: Path) -> None:
    """Refuse weights holding NaN or infinity: no model is worth writing (as training refuses to export one)."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if bad:
        raise CheckpointError(
            f"{src}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}): the model is broken (a diverged run or a damaged file); "
            "use an earlier checkpoint, or copy the model again"
        )


def check_size(config: LoopMoEConfig, state: dict[str, torch.Tensor], src: Path) -> None:
    """Refuse a config.json that describes far more parameters than the weights hold, before a model of
    its size is built (a hostile or mistyped config would otherwise allocate whatever it asks for)."""
    implied = compute_budget(config, 1).total_params
    present = sum(t.numel() for t in state.values())
    if implied > 2 * present + 1_000_000:
        raise CheckpointError(
            f"{src}/config.json describes a model of {implied:,} parameters but its weights hold {present:,}: "
            "the config does not belong to these weights; copy the checkpoint again"
        )


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], src: Path) -> None:
    """Refuse weights that miss a tensor the config needs, or hold one of another shape."""
    missing = sorted(k for k in expected if k not in state and not k.endswith("expert_bias"))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    refuse_mismatched_weights(src, missing, wrong)


# What a tokenizer folder may hold besides the files that make it one (the chat template among them:
# transformers writes it to chat_template.jinja).
TOKENIZER_EXTRAS = ("chat_template.jinja", "chat_template.json", "special_tokens_map.json", "merges.txt")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of ``src``, refusing a link that leads out of it (a file meant for sharing
    must not pick up whatever a symlink points at)."""
    root = src.resolve()
    for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRAS):
        path = src / name
        if not path.is_file():
            continue
        if path.is_symlink() and root not in path.resolve().parents:
            raise CheckpointError(
                f"{path} is a symlink to {path.resolve()}, outside {src}: loopmoe does not copy files from outside "
                "a checkpoint into its export; replace the link with the file itself"
            )
        shutil.copyfile(path, dst / name)
