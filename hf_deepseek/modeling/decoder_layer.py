"""One transformer block: RMSNorm -> MLA -> residual -> RMSNorm -> dense MLP or DeepSeekMoE -> residual."""

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ..configuration import DeepSeekConfig
from ..kernels import moe_gemv
from .attention import MultiHeadLatentAttention
from .layers import RMSNorm, SwiGLUMLP
from .moe import DeepSeekMoE


class DeepSeekDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepSeekMoE(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The new hidden states; with `output_attentions`, (hidden states, attention weights [B, H, T, S])."""
        if moe_gemv.FUSED_INPUT_NORM and not self.training:  # the norm in q_a/kv_a's launch at decode
            attn_input, norm = hidden_states, {"input_norm": self.input_layernorm}
        else:
            attn_input, norm = self.input_layernorm(hidden_states), {}
        attn_out, attn_weights = self.self_attn(
            attn_input,
            position_embeddings,
            attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            **norm,
            **kwargs,
        )
        routed = None
        if isinstance(self.mlp, DeepSeekMoE):  # decode on CUDA, opt-in: the sum, norm and routing in one launch
            routed = self.mlp.route_after_attention(self.post_attention_layernorm, hidden_states, attn_out)
        if routed is None:
            hidden_states = hidden_states + attn_out
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        else:
            hidden_states, normed, routes = routed
            hidden_states = hidden_states + self.mlp(normed, routes=routes)
        return (hidden_states, attn_weights) if output_attentions else hidden_states
