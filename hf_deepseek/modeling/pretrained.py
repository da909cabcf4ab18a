"""What every DeepSeek model class shares, below both the network (`model.py`) and the decoding code that drives a
model from outside (`speculative.py`): the base class with transformers' model surface (config class,
`base_model_prefix`, weight initialisation, capability flags) and the causal-LM output type.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from ..configuration import DeepSeekConfig
from .layers import RMSNorm
from .moe import RoutedExperts, TopKRouter

# transformers 5.24 renamed `past_key_values` to `cache`; the model takes either and returns the installed name.
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class DeepSeekCausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` is the total training loss; `mtp_loss` (mean over depths) and `aux_loss` (balance) are its parts.
    `expert_load` [num_moe_layers, n_routed_experts] holds token counts per expert when asked for."""

    mtp_loss: torch.FloatTensor | None = None
    expert_load: torch.Tensor | None = None


class DeepSeekPreTrainedModel(PreTrainedModel):
    config_class = DeepSeekConfig
    config: DeepSeekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepSeekDecoderLayer", "MTPLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # no host reads in traced code: input checks and MoE dispatch guard on tracing
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    # the official MTP layer repeats the shared embedding and head; this model shares the main ones instead
    _keys_to_ignore_on_load_unexpected = [r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight"]

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """A no-op, as `DeepSeekConfig.register_for_auto_class`: saved checkpoints keep `hf_deepseek_auto` in their
        `auto_map` rather than copies of this package's source files."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, RoutedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


__all__ = ["CACHE_FIELD", "DeepSeekCausalLMOutput", "DeepSeekPreTrainedModel"]
