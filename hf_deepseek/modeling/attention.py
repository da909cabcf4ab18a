"""Multi-head Latent Attention (DeepSeek-V2/V3) with decoupled RoPE (YaRN-aware) and a latent KV cache.

Per token and layer the cache holds only the normalised kv latent (`kv_lora_rank`) and the roped key
(`qk_rope_head_dim`). Training and prefill expand the latent through `kv_b_proj` and run the transformers
attention interface (SDPA by default); decoding absorbs `kv_b_proj` into the query and the output, so it
attends over the latent directly as multi-query attention and never re-expands cached tokens.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torchdynamo_compiling

from ..configuration import DeepSeekConfig
from ..kernels import mla_chain
from .decode_linear import fused_norm_linear, fused_norm_pair, fused_pair
from .joined_projections import joined_projections
from .latent_cache import LatentStaticCache
from .layers import RMSNorm
from .mla_decode import chain_cache_attention, front_cache_attention, latent_cache_attention


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the rotary part of q and k, from transformers' RoPE initialisers (`ROPE_INIT_FUNCTIONS`:
    linear, dynamic, yarn, llama3, longrope, ...); `dynamic_rope_update` recomputes them for the types that depend
    on the sequence length (dynamic NTK, longrope), as in transformers' own models."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        default = self.rope_type == "default"
        init_fn = self.compute_default_rope_parameters if default else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DeepSeekConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        dim, base = config.qk_rope_head_dim, config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, rope_dim / 2]: one angle per rotated pair
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        return (freqs.cos() * self.attention_scaling).to(x.dtype), (freqs.sin() * self.attention_scaling).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by the angles in cos/sin [B, T, d/2].

    DeepSeek's weights pair dimensions (0,1), (2,3), ... (`interleaved`); the output is laid out
    [rotated evens, rotated odds]. q and k are permuted the same way, so q.k is unchanged.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def yarn_softmax_scale(config: DeepSeekConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale^2 when the context is extended (DeepSeek-V3: factor 40)."""
    scale = config.qk_head_dim**-0.5
    rope = config.rope_parameters
    factor, mscale_all_dim = rope.get("factor", 1.0), rope.get("mscale_all_dim", 0)
    if rope.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention with full-head keys, for `attn_implementation="eager"` and for `output_attentions`
    under the other implementations, whose masks it also reads: boolean (keep), or None for causal (SDPA)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and module.is_causal and q_len > 1:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    elif attention_mask is not None:
        scores = scores + attention_mask[..., :k_len]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class MultiHeadLatentAttention(nn.Module):
    """MLA: low-rank q (optional) and joint kv compression, decoupled RoPE key shared by all heads."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1  # the expanded path has full per-head keys and values
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.scaling = yarn_softmax_scale(config)
        self.is_causal = True
        hidden, bias, eps = config.hidden_size, config.attention_bias, config.rms_norm_eps

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=bias)
        self._dense_kv_b: tuple | None = None  # (weight version, dense weight) of a quantised kv_b_proj

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        input_norm: nn.Module | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output [B, T, hidden], attention weights [B, H, T, S] with `output_attentions`, else None). With
        `input_norm` (the layer's input RMSNorm) hidden_states are the layer's input, normed here: in q_a/kv_a's
        launch at decode where `decode_linear.fused_norm_pair` serves."""
        bsz, q_len, _ = hidden_states.shape
        projected = None
        if input_norm is not None:
            # the opt-in MLA chain takes the normed input in its own launch: the norm is then applied here
            projected = None if mla_chain.ENABLED else self._input_projections(hidden_states, input_norm)
            if projected is None:
                hidden_states = input_norm(hidden_states)
        if projected is None:
            out = chain_cache_attention(self, hidden_states, position_embeddings, cache)  # opt-in: one launch
            if out is not None:
                return self.o_proj(out.reshape(bsz, q_len, self.num_heads * self.v_dim)), None
            projected = self._input_projections(hidden_states)
        q, kv_a = projected
        if self.q_lora_rank is not None:  # the norm in q_b's launch at decode where `fused_norm_linear` serves
            fused = fused_norm_linear(self.q_a_layernorm, self.q_b_proj, q)
            q = fused if fused is not None else self.q_b_proj(self.q_a_layernorm(q))
        if isinstance(cache, LatentStaticCache):  # a decode step's kv norm, RoPE and cache write in one launch
            out = front_cache_attention(self, q, kv_a, position_embeddings, cache)
            if out is not None:
                return self.o_proj(out.reshape(bsz, q_len, self.num_heads * self.v_dim)), None
        q = q.view(bsz, q_len, self.num_heads, self.qk_head_dim).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)

        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(bsz, 1, q_len, self.kv_lora_rank)  # one shared "head"
        k_rope = k_rope.view(bsz, 1, q_len, self.rope_dim)
        cos, sin = position_embeddings
        q_rope = apply_rope(q_rope, cos, sin, self.config.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, self.config.rope_interleave)

        if isinstance(cache, LatentStaticCache):  # the fast decode path: static latent cache (mla_decode.py)
            out = latent_cache_attention(self, q_nope, q_rope, latent, k_rope, cache, attention_mask, **kwargs)
            return self.o_proj(out.reshape(bsz, q_len, self.num_heads * self.v_dim)), None
        past_len = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)  # [B, 1, S, r], [B, 1, S, rope]

        if past_len > 0 and (attention_mask is None or isinstance(attention_mask, torch.Tensor)):
            out, weights = self._absorbed_attention(q_nope, q_rope, latent, k_rope, attention_mask, past_len)
        else:
            out, weights = self._expanded_attention(
                q_nope, q_rope, latent, k_rope, attention_mask, output_attentions, **kwargs
            )
        out = self.o_proj(out.reshape(bsz, q_len, self.num_heads * self.v_dim))
        return out, weights if output_attentions else None

    def _input_projections(
        self, hidden_states: torch.Tensor, input_norm: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q_a_proj's output, or q_proj's without a q rank; kv_a_proj_with_mqa's) of hidden_states: both projections
        read the same input, so a decode row takes them in one launch where `decode_linear.fused_pair` serves, and a
        training step one GEMM where `joined_projections` does. With `input_norm`, of input_norm(hidden_states) in
        that launch where `decode_linear.fused_norm_pair` serves, else None."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        if input_norm is not None:
            return fused_norm_pair(input_norm, first, self.kv_a_proj_with_mqa, hidden_states)
        pair = fused_pair(first, self.kv_a_proj_with_mqa, hidden_states)
        if pair is None:  # training, opt-in: one GEMM over both weights
            pair = joined_projections(first, self.kv_a_proj_with_mqa, hidden_states)
        if pair is not None:
            return pair
        return first(hidden_states), self.kv_a_proj_with_mqa(hidden_states)

    def _expanded_attention(
        self, q_nope, q_rope, latent, k_rope, attention_mask, output_attentions: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training / prefill: up-project the latent to per-head keys and values, run the attention interface
        (the eager one when the weights are asked for: the fused kernels do not return them)."""
        bsz, _, seq_len, _ = latent.shape
        if self.kv_b_proj.weight.dtype == torch.float8_e4m3fn:
            # FP8 inference weights: the dequantised weight absorbed decoding uses (DeepSeek's absorb mode), so the
            # prefill's keys and values are the ones later steps see (an FP8 GEMM would quantise the latent too)
            kv = F.linear(latent[:, 0], self.dense_kv_b_weight().flatten(0, 1).to(latent.dtype))
        else:
            kv = self.kv_b_proj(latent[:, 0])  # [B, S, r] -> [B, S, H*(nope+v)]; 3-D, as int8 kernels require
        kv = kv.view(bsz, seq_len, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        key = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        query = torch.cat([q_nope, q_rope], dim=-1)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        if output_attentions:
            attention = eager_attention
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return out, weights  # [B, T, H, v], [B, H, T, S] or None

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, r] and W_UV [H, v, r] split out of kv_b_proj (views)."""
        weight = self.kv_b_proj.weight
        if torch.is_grad_enabled() and weight.requires_grad:  # training through the absorbed path: keep autograd
            w = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        else:
            w = self.dense_kv_b_weight()
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def dense_kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj's weight as a dense, detached [H, nope + v, r] tensor. A quantised projection (FP8 blocks,
        bitsandbytes int8 or nf4) stores something else under `weight`, so it is applied to the identity instead,
        once per weight version; a compiled step reuses the copy made outside it (by the uncompiled prefill)."""
        weight = self.kv_b_proj.weight
        shape = (self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        if weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return weight.detach().view(shape)
        if is_torchdynamo_compiling():
            return self._dense_kv_b[1] if self._dense_kv_b is not None else self._kv_b_on_identity(shape)
        key = (weight.data_ptr(), weight._version, weight.device)
        if self._dense_kv_b is None or self._dense_kv_b[0] != key:
            self._dense_kv_b = (key, self._kv_b_on_identity(shape))
        return self._dense_kv_b[1]

    def _kv_b_on_identity(self, shape: tuple[int, int, int]) -> torch.Tensor:
        eye = torch.eye(self.kv_lora_rank, device=self.kv_b_proj.weight.device, dtype=self.kv_a_layernorm.weight.dtype)
        return self.kv_b_proj(eye).detach().T.contiguous().view(shape)

    def _absorbed_attention(
        self, q_nope, q_rope, latent, k_rope, attention_mask, past_len
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode: multi-query attention over the cached latent; kv_b_proj is folded into q and the output.

        Heads are folded into the query length ([B, H*T, r] against [B, S, r]) so each cached latent is read
        once per matmul and never copied per head or concatenated with the rope key.
        """
        w_uk, w_uv = self.absorbed_weights()
        bsz, heads, q_len, _ = q_nope.shape
        seq_len = latent.shape[2]
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # [B, H, T, r]
        scores = torch.bmm(q_latent.reshape(bsz, heads * q_len, -1), latent[:, 0].transpose(1, 2))
        scores = scores + torch.bmm(q_rope.reshape(bsz, heads * q_len, -1), k_rope[:, 0].transpose(1, 2))
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # fp32 softmax for bf16, keeps fp64
        scores = (scores.to(softmax_dtype) * self.scaling).view(bsz, heads, q_len, seq_len)  # [B, H, T, S]
        if attention_mask is None or attention_mask.dim() == 2:  # no 4D mask: causal with an offset (+ padding)
            keep = torch.ones(q_len, seq_len, dtype=torch.bool, device=scores.device).tril(past_len)
            if attention_mask is not None:  # a 2D [B, S] padding mask (flash-attention style)
                keep = keep & attention_mask[:, None, None, :seq_len].bool()
            scores = scores.masked_fill(~keep, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., :seq_len], float("-inf"))
        else:
            scores = scores + attention_mask[..., :seq_len]
        probs = F.softmax(scores, dim=-1).to(latent.dtype)
        probs = F.dropout(probs, p=self.config.attention_dropout if self.training else 0.0, training=self.training)
        out_latent = torch.bmm(probs.view(bsz, heads * q_len, seq_len), latent[:, 0])  # [B, H*T, r]
        out_latent = out_latent.view(bsz, heads, q_len, -1)
        return torch.einsum("bhtr,hvr->bthv", out_latent, w_uv), probs  # [B, T, H, v], [B, H, T, S]
