"""Lets transformers load this checkpoint by path (`trust_remote_code=True`), no import needed.

Written by hf-deepseek's `save_pretrained`; the code itself lives in the installed `hf-deepseek` package."""

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM, DeepSeekModel

__all__ = ["DeepSeekConfig", "DeepSeekForCausalLM", "DeepSeekModel"]
