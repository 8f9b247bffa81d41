"""Checkpoint converters between LoopMoE and other architectures."""

from loopmoe.convert.qwen3_moe import convert_qwen3_moe, export_qwen3_moe, loopmoe_config_from_qwen3_moe

__all__ = ["convert_qwen3_moe", "export_qwen3_moe", "loopmoe_config_from_qwen3_moe"]
