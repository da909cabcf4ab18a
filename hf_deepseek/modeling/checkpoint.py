"""The official DeepSeek-V3 checkpoint layout <-> this model's modules.

Routed experts are stacked in memory but stored per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`):
transformers' weight-conversion machinery merges them on load and splits them again on save. The MTP layer
lives at `model.layers.{num_hidden_layers}` already; on save it also gets the copies of the shared embedding
and output head that the official layout carries there (`embed_tokens`, `shared_head.head`).
"""

import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from ..configuration import DeepSeekConfig

EXPERT_CONVERSIONS = [
    WeightConverter(
        source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
        target_patterns="mlp.experts.gate_up_proj",
        operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter(
        source_patterns="mlp.experts.*.down_proj.weight",
        target_patterns="mlp.experts.down_proj",
        operations=[MergeModulelist(dim=0)],
    ),
]


def register_checkpoint_layout() -> None:
    """Teach transformers' loader and saver the per-expert layout for `model_type = "hf_deepseek"`."""
    register_checkpoint_conversion_mapping(DeepSeekConfig.model_type, EXPERT_CONVERSIONS, overwrite=True)


def add_mtp_shared_copies(state_dict: dict[str, torch.Tensor], config: DeepSeekConfig) -> dict[str, torch.Tensor]:
    """Add the official MTP layer's own copies of the embedding and output head to a state dict to be saved."""
    embed = state_dict.get("model.embed_tokens.weight")
    head = state_dict.get("lm_head.weight", embed)
    if embed is None:
        return state_dict
    state_dict = dict(state_dict)
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}"
        state_dict[f"{prefix}.embed_tokens.weight"] = embed.detach().clone()
        state_dict[f"{prefix}.shared_head.head.weight"] = head.detach().clone()
    return state_dict
