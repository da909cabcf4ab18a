"""hf-deepseek: DeepSeek-V3 / R1 for the Hugging Face stack.

Importing the package registers `DeepSeekConfig` (`model_type = "hf_deepseek"`) and its models with
transformers' Auto classes, and the official checkpoint layout with transformers' loader.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import DeepSeekConfig
from .modeling import DeepSeekCausalLMOutput, DeepSeekForCausalLM, DeepSeekModel, DeepSeekPreTrainedModel
from .modeling.checkpoint import register_checkpoint_layout

AutoConfig.register(DeepSeekConfig.model_type, DeepSeekConfig, exist_ok=True)
AutoModel.register(DeepSeekConfig, DeepSeekModel, exist_ok=True)
AutoModelForCausalLM.register(DeepSeekConfig, DeepSeekForCausalLM, exist_ok=True)
register_checkpoint_layout()

__version__ = "0.1.0"
__all__ = [
    "DeepSeekCausalLMOutput",
    "DeepSeekConfig",
    "DeepSeekForCausalLM",
    "DeepSeekModel",
    "DeepSeekPreTrainedModel",
]
