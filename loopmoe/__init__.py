"""LoopMoE: looped Mixture-of-Experts language models and matched-budget comparisons.

Importing the package registers ``LoopMoEConfig`` and ``LoopMoEForCausalLM`` with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` works without trust_remote_code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from loopmoe.config import LoopMoEConfig
from loopmoe.model import LoopMoEForCausalLM, LoopMoEModel

AutoConfig.register(LoopMoEConfig.model_type, LoopMoEConfig, exist_ok=True)
AutoModel.register(LoopMoEConfig, LoopMoEModel, exist_ok=True)
AutoModelForCausalLM.register(LoopMoEConfig, LoopMoEForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["LoopMoEConfig", "LoopMoEForCausalLM", "LoopMoEModel", "__version__"]
