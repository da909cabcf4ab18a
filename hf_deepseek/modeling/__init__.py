"""The DeepSeek-V3 network: MLA, DeepSeekMoE, MTP, and the official checkpoint layout."""

from .model import DeepSeekCausalLMOutput, DeepSeekForCausalLM, DeepSeekModel, DeepSeekPreTrainedModel

__all__ = ["DeepSeekCausalLMOutput", "DeepSeekForCausalLM", "DeepSeekModel", "DeepSeekPreTrainedModel"]
