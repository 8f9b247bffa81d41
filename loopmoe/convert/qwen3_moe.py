"""Qwen3-MoE (transformers) checkpoint -> LoopMoE checkpoint with T = 1.

A Vanilla MoE in LoopMoE with pre-norm, softmax top-k routing, QK-norm, GQA and RoPE is the
Qwen3-MoE architecture, so conversion is a renaming (``model.layers.i`` -> ``model.core.i``) plus
fusing per-expert weights into the 3-D expert tensors. Weights are read with safetensors (or
``torch.load(weights_only=True)`` for ``.bin`` files): nothing in the source folder is executed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from loopmoe.config import LoopMoEConfig

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

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def loopmoe_config_from_qwen3_moe(qwen: dict) -> LoopMoEConfig:
    """Map a Qwen3-MoE ``config.json`` dict onto an equivalent LoopMoEConfig (T = 1, no conditioning)."""
    if qwen.get("model_type") != "qwen3_moe":
        raise ValueError(f"expected a Qwen3-MoE config (model_type 'qwen3_moe'), got {qwen.get('model_type')!r}")
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
        raise ValueError(
            f"this Qwen3-MoE checkpoint uses features LoopMoE does not model: {', '.join(bad)}. Only all-MoE "
            f"layers (mlp_only_layers=[], decoder_sparse_step=1), full attention without bias, SiLU experts and "
            f"default RoPE convert exactly."
        )
    rope = qwen.get("rope_parameters") or {}
    num_experts = qwen.get("num_experts", qwen.get("num_local_experts"))
    if num_experts is None:
        raise ValueError("this Qwen3-MoE config has no num_experts (nor num_local_experts): not an MoE checkpoint")
    return LoopMoEConfig(
        vocab_size=qwen["vocab_size"],
        hidden_size=qwen["hidden_size"],
        num_core_layers=qwen["num_hidden_layers"],
        num_loops=1,
        iter_conditioning="none",
        num_attention_heads=qwen["num_attention_heads"],
        num_key_value_heads=qwen["num_key_value_heads"],
        head_dim=qwen.get("head_dim") or qwen["hidden_size"] // qwen["num_attention_heads"],
        qk_norm=True,
        rope_theta=rope.get("rope_theta", qwen.get("rope_theta", 10000.0)),
        max_position_embeddings=qwen.get("max_position_embeddings", 4096),
        num_experts=num_experts,
        num_experts_per_tok=qwen["num_experts_per_tok"],
        moe_intermediate_size=qwen["moe_intermediate_size"],
        router_score="softmax",
        norm_topk_prob=qwen.get("norm_topk_prob", False),
        router_aux_loss_coef=qwen.get("router_aux_loss_coef", 0.001),
        rms_norm_eps=qwen.get("rms_norm_eps", 1e-6),
        initializer_range=qwen.get("initializer_range", 0.02),
        tie_word_embeddings=qwen.get("tie_word_embeddings", False),
        pad_token_id=qwen.get("pad_token_id"),
        bos_token_id=qwen.get("bos_token_id"),
        eos_token_id=qwen.get("eos_token_id"),
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint folder, without executing anything from it."""
    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open objects are not iterable: keys() is the listing
                tensors[key] = f.get_tensor(key)
    if not files:
        for file in sorted(folder.glob("pytorch_model*.bin")):
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    return tensors


def qwen3_moe_state_dict_to_loopmoe(qwen_sd: dict[str, torch.Tensor], config: LoopMoEConfig) -> dict[str, torch.Tensor]:
    """Rename layers to the core and fuse per-expert weights into ``[E, 2f, d]`` / ``[E, d, f]`` tensors."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[int, int, str], torch.Tensor] = {}
    for key, value in qwen_sd.items():
        m = _EXPERT_KEY.match(key)
        if m:
            per_expert[(int(m.group(1)), int(m.group(2)), m.group(3))] = value
        elif key.startswith("model.layers."):
            out["model.core." + key[len("model.layers.") :]] = value
        else:
            out[key] = value
    E = config.num_experts
    for layer in sorted({k[0] for k in per_expert}):
        try:
            gate = [per_expert[(layer, e, "gate_proj")] for e in range(E)]
            up = [per_expert[(layer, e, "up_proj")] for e in range(E)]
            down = [per_expert[(layer, e, "down_proj")] for e in range(E)]
        except KeyError as missing:
            raise ValueError(f"layer {layer}: expert weight {missing} is missing from the checkpoint") from None
        prefix = f"model.core.{layer}.mlp.experts."
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        out[prefix + "down_proj"] = torch.stack(down)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def convert_qwen3_moe(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert the Qwen3-MoE checkpoint folder ``src`` into a LoopMoE checkpoint folder ``dst``."""
    from loopmoe.model import LoopMoEForCausalLM

    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a transformers Qwen3-MoE checkpoint directory")
    config = loopmoe_config_from_qwen3_moe(json.loads(config_path.read_text()))
    state = qwen3_moe_state_dict_to_loopmoe(read_weights(src), config)
    model = LoopMoEForCausalLM(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(k for k in expected - set(state) if not k.endswith("expert_bias"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the Qwen3-MoE layout: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)  # type: ignore[arg-type]  # transformers: .to is typed as wraps(nn.Module.to), its self as the first argument
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst
