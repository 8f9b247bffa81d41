"""The LoopMoE model: config-driven looped (or vanilla) MoE decoder, HuggingFace-native."""

from loopmoe.model.modeling import LoopMoECausalLMOutput, LoopMoEForCausalLM, LoopMoEModel

__all__ = ["LoopMoECausalLMOutput", "LoopMoEForCausalLM", "LoopMoEModel"]
