"""Multi-Token Prediction modules (DeepSeek-V3 section 2.2).

Depth k predicts the token k+1 positions ahead: concat(enorm(embedding of token t+k), hnorm(h^{k-1}_t))
-> eh_proj (2d -> d) -> one full decoder layer -> shared_head.norm -> the main model's output head.
h^0 is the main model's final (normed) hidden state, as in vLLM and transformers' MTP drafting. The
module sits at `model.layers.{num_hidden_layers + k - 1}`, the official checkpoint's place for it.
"""

import torch
from torch import nn

from ..configuration import DeepSeekConfig
from .decoder_layer import DeepSeekDecoderLayer
from .layers import RMSNorm


class SharedHeadNorm(nn.Module):
    """Holds `shared_head.norm`; the head itself is the main model's `lm_head` (shared, not a copy)."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DeepSeekDecoderLayer):
    """A decoder layer plus the MTP input projection; its parameter names match the official checkpoint."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHeadNorm(config)

    def forward_mtp(
        self,
        token_embeds: torch.Tensor,
        previous_hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (h^k before the head norm, to chain the next depth; h^k normed, for the shared head).

        Goes through the module call, so every parameter of the MTP module is used inside one forward: FSDP2
        gathers them all there, and gradient checkpointing and regional compilation cover the whole module."""
        # positional: reentrant gradient checkpointing passes gradients only to positional tensors
        return self(previous_hidden, position_embeddings, attention_mask, cache, token_embeds, **kwargs)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, mtp_token_embeds=None,
                **kwargs):  # fmt: skip
        """With `mtp_token_embeds`, the MTP module (see `forward_mtp`); without, a plain decoder layer."""
        if mtp_token_embeds is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        hidden = self.eh_proj(torch.cat([self.enorm(mtp_token_embeds), self.hnorm(hidden_states)], dim=-1))
        hidden = super().forward(hidden, position_embeddings, attention_mask, cache=cache, **kwargs)
        return hidden, self.shared_head.norm(hidden)


def shift_left(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """x[:, t] <- x[:, t + k]; the last k positions get `fill`."""
    out = torch.full_like(x, fill)
    out[:, : x.shape[1] - k] = x[:, k:]
    return out


def mtp_labels(labels: torch.Tensor, depth: int, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Labels for depth k, aligned so the usual shift-by-one loss makes position t predict token t+1+k.

    With packed (padding-free) batches a target in the next document is masked out: its position id must be
    exactly 1+k past the current one.
    """
    shifted = shift_left(labels, depth, -100)
    if position_ids is not None and position_ids.shape == labels.shape:
        ahead = shift_left(position_ids, depth + 1, -1)
        same_doc = ahead == position_ids + depth + 1
        # shift_left by one more: the loss compares position t with label t+1
        shifted = torch.where(torch.cat([same_doc[:, -1:], same_doc[:, :-1]], dim=1), shifted, -100)
    return shifted
