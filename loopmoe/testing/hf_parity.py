"""Parity with transformers' Qwen3-MoE: a LoopMoE with T = 1 must compute exactly what Qwen3-MoE does.

The tests and the benchmarks (``bench/``) use the same steps:

1. :func:`qwen_model` builds transformers' ``Qwen3MoeForCausalLM`` with random weights (seeded);
2. :func:`ours_from_qwen` converts it to LoopMoE through the checkpoint converter
   (``loopmoe.convert.convert_qwen3_moe``), as a user's checkpoint would be;
3. :func:`check_logits` compares the two models' logits, :func:`check_training` their training loss and
   the gradients of the LM head and the embedding. Both raise ``AssertionError`` above a tolerance and
   return the differences otherwise.

Only transformers and torch are needed (no hub access: the models are built from a config).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loopmoe.convert.qwen3_moe import convert_qwen3_moe
from loopmoe.model import LoopMoEForCausalLM

if TYPE_CHECKING:
    from transformers import Qwen3MoeForCausalLM

# The tiny Qwen3-MoE of the reference benchmark script (same shape as the "bench" preset).
QWEN_CONFIG: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=512,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    output_router_logits=True,
    router_aux_loss_coef=0.001,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)


def qwen_model(
    experts_implementation: str = "grouped_mm", config: dict[str, Any] | None = None, seed: int = 0
) -> Qwen3MoeForCausalLM:
    """transformers' ``Qwen3MoeForCausalLM`` with random weights drawn after ``torch.manual_seed(seed)``.

    ``config``: ``Qwen3MoeConfig`` keyword arguments (default :data:`QWEN_CONFIG`); fp32, SDPA attention,
    and the given ``experts_implementation`` (``"grouped_mm"`` or ``"eager"``).
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM._from_config(
        Qwen3MoeConfig(**(config or QWEN_CONFIG)),
        attn_implementation="sdpa",
        experts_implementation=experts_implementation,
        dtype=torch.float32,
    )


def ours_from_qwen(qwen: Qwen3MoeForCausalLM, **config_overrides: Any) -> LoopMoEForCausalLM:
    """Convert a transformers Qwen3-MoE model to LoopMoE (T = 1) through the checkpoint converter (fp32).

    ``config_overrides`` go to ``LoopMoEForCausalLM.from_pretrained``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "qwen", Path(tmp) / "loopmoe"
        qwen.save_pretrained(src)
        convert_qwen3_moe(src, dst)
        return LoopMoEForCausalLM.from_pretrained(dst, dtype=torch.float32, **config_overrides)


def check_logits(
    ours: LoopMoEForCausalLM,
    ref: Qwen3MoeForCausalLM,
    vocab: int = 8192,
    tol: float = 1e-4,
    batch: int = 2,
    seq: int = 64,
) -> float:
    """Max |logits_ours - logits_ref| in eval mode on random ids (fixed seed); raises when not below ``tol``.

    Both models are put back in their previous train/eval mode.
    """
    ids = torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    was = ours.training, ref.training
    ours.eval(), ref.eval()
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    ours.train(was[0]), ref.train(was[1])
    if not diff < tol:
        raise AssertionError(
            f"logits differ from transformers by {diff:.2e} (> {tol:.0e}): timings would be meaningless"
        )
    return diff


def check_training(
    ours: LoopMoEForCausalLM, ref: Qwen3MoeForCausalLM, ids: torch.Tensor, tol: float = 1e-4
) -> dict[str, float]:
    """Training mode with labels (ours: the fused LM-head loss, no logits) against transformers:
    the language-model loss and its gradients of the LM head and the embedding, relative; raises when
    above ``tol``. (The router balancing losses are left out: transformers' is one switch loss over
    all layers' routing, ours the mean of per-layer ones; both are timed with theirs.)

    Returns {"loss", "lm_head_grad", "embedding_grad"}: max |ours - ref| / max |ref| of each.
    """
    grads = {}
    models: tuple[tuple[str, LoopMoEForCausalLM | Qwen3MoeForCausalLM], ...] = (("ours", ours), ("ref", ref))
    for name, m in models:
        m.zero_grad(set_to_none=True)
        if name == "ours":
            loss = m(input_ids=ids, labels=ids).lm_loss
        else:
            loss = m(input_ids=ids, labels=ids, output_router_logits=False).loss
        loss.backward()
        grads[name] = (loss.detach(), _weight_grad(m.lm_head), _weight_grad(m.get_input_embeddings()))
        m.zero_grad(set_to_none=True)
    diffs = {}
    for key, a, b in zip(("loss", "lm_head_grad", "embedding_grad"), grads["ours"], grads["ref"]):
        diffs[key] = ((a - b).abs().max() / b.abs().max()).item()
    if not max(diffs.values()) < tol:
        raise AssertionError(f"training loss/gradients differ from transformers: {diffs} (> {tol:.0e})")
    return diffs


def _weight_grad(module: torch.nn.Module) -> torch.Tensor:
    """A copy of the gradient of ``module.weight`` (set by the backward just run)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor) and weight.grad is not None
    return weight.grad.clone()
