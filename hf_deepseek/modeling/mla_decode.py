"""MLA over the static latent cache (`latent_cache.LatentStaticCache`): the fast decode path's attention.

A fresh prefill attends over its own tokens with the expanded (training) path and writes the latent to the cache.
Every later pass (decode, chunked prefill, speculative verification) is absorbed multi-query attention over the
cache buffer: the query is folded through W_UK into latent space and concatenated with its roped part, so one
batched matmul against the [B, L, r + rope] buffer gives the scores and one against its latent part gives the
output, which W_UV maps back to heads. Shapes are static (the whole buffer, masked past each row's length), the
length is a device tensor, and nothing reads device values on the host: the step compiles into CUDA graphs.
One query token per row over a cache without padding goes through a split-KV kernel that reads each row only up to
its length: by default (HF_DEEPSEEK_DECODE_ATTENTION=auto) a Triton one (`kernels/mla_decode_triton.py`) for up to 8
rows and FlashMLA's (`kernels/flash_mla_decode.py`, where it is installed) for more. With
HF_DEEPSEEK_HEAD_MATMUL=1 the W_UK and W_UV products of up to 64 query rows take a per-head Triton kernel
(`kernels/head_matmul.py`) instead of cuBLAS's batched matmul; by default (HF_DEEPSEEK_MLA_FRONT=0 turns it off) a
decode step's kv norm, RoPE, cache write and W_UK product take one launch before either kernel
(`front_cache_attention`), and with HF_DEEPSEEK_MLA_CHAIN=1 a batch-1 step's q_a, kv_a and q_b projections take
that launch too (`chain_cache_attention`).
"""

import torch
import torch.nn.functional as F
from transformers.utils import is_torchdynamo_compiling

from ..kernels import mla_chain, mla_decode_triton, mla_front
from ..kernels.flash_mla_decode import flash_latent_attention, flash_mla_schedule, row_lengths
from ..kernels.head_matmul import absorb_query, values_from_latent
from ..kernels.mla_decode_triton import triton_latent_attention
from .decode_linear import DecodeLinear, single_decode_row
from .latent_cache import LatentStaticCache


def latent_cache_attention(attn, q_nope, q_rope, latent, k_rope, cache: LatentStaticCache, attention_mask, **kwargs):
    """q_nope [B, H, T, nope], q_rope [B, H, T, rope], the new latent [B, 1, T, r] and k_rope [B, 1, T, rope]
    -> attention output [B, T, H, v]; the new tokens are written to `cache` first."""
    q_len = q_nope.shape[2]
    fresh = q_len > 1 and not is_torchdynamo_compiling() and int(cache.layer_length(attn.layer_idx)) == 0
    cache.update(latent, k_rope, attn.layer_idx)
    if fresh:  # prefill from empty: the cache holds only these tokens, masks cover [:T] of the buffer
        mask = attention_mask[..., :q_len] if isinstance(attention_mask, torch.Tensor) else attention_mask
        return attn._expanded_attention(q_nope, q_rope, latent, k_rope, mask, **kwargs)[0]
    layer = cache.layers[attn.layer_idx]
    length = layer.cumulative_length
    if layer.flash_mla and cache.unpadded and q_len == 1:  # one token per row, no padding: FlashMLA's kernel
        return flash_cache_attention(attn, q_nope, q_rope, layer.storage, length, cache)
    if layer.triton_attention and cache.unpadded and q_len == 1:  # the same through the Triton kernel
        # through `buffer()`: a second graph input aliasing the written storage would cost the step its CUDA graphs
        return triton_cache_attention(attn, q_nope, q_rope, layer.buffer(), length)
    buffer = layer.buffer()
    if q_len > 1 and not is_torchdynamo_compiling():  # an eager prefill chunk: score only the tokens written so far
        buffer = buffer[:, : int(length)]
    return absorbed_cache_attention(attn, q_nope, q_rope, buffer, length, attention_mask)


def front_layer(attn, cache, q_len: int):
    """`attn`'s layer of `cache` where a front launch can write its new token and a split-KV kernel read it: one
    token per row over an unpadded latent cache that FlashMLA's or the Triton kernel reads; else None."""
    if not isinstance(cache, LatentStaticCache) or q_len != 1 or not cache.unpadded:
        return None
    layer = cache.layers[attn.layer_idx]
    return layer if layer.is_initialized and (layer.flash_mla or layer.triton_attention) else None


def front_cache_attention(attn, q, kv_a, position_embeddings, cache: LatentStaticCache) -> torch.Tensor | None:
    """A decode step's attention from q_b's output q [B, 1, H * (nope + rope)] and kv_a's [B, 1, r + rope] where
    `kernels/mla_front.py` serves (`front_layer`): the new token written to `cache` and the joined query made in one
    launch -> [B, 1, H, v]; else None."""
    bsz, q_len = q.shape[:2]
    layer = front_layer(attn, cache, q_len)
    if layer is None or not mla_front.usable(q, kv_a, layer.storage):
        return None
    cos, sin = position_embeddings  # [B or 1, 1, rope / 2]: one row where every row shares its positions
    w_uk, _ = attn.absorbed_weights()
    norm = attn.kv_a_layernorm
    query, lengths = mla_front.mla_decode_front(
        q.view(bsz, attn.num_heads, attn.qk_head_dim), kv_a.view(bsz, -1), cos[:, 0].expand(bsz, -1),
        sin[:, 0].expand(bsz, -1), norm.weight, norm.eps, w_uk, layer.storage, layer.cumulative_length,
        attn.config.rope_interleave,
    )  # fmt: skip
    return joined_query_attention(attn, layer, cache, query, lengths)


def joined_query_attention(attn, layer, cache: LatentStaticCache, query, lengths) -> torch.Tensor:
    """The attention over `layer`'s latent cache of the joined query [B, H, r + rope] a front launch made (with the
    rows' lengths [B] int32): FlashMLA's or the Triton kernel -> [B, 1, H, v]."""
    query = query.unsqueeze(2)  # [B, H, 1, r + rope]; lengths [B] int32, as both attention kernels take them
    if layer.flash_mla:
        return flash_cache_attention(attn, None, None, layer.storage, lengths, cache, query)
    return triton_cache_attention(attn, None, None, layer.buffer(), lengths, query)


def chain_cache_attention(attn, hidden_states, position_embeddings, cache) -> torch.Tensor | None:
    """A batch-1 decode step's attention from the layer's normed input [1, 1, d] where `kernels/mla_chain.py`
    serves (bf16 q_a, kv_a and q_b without biases, the q_a norm in their dtype, `front_layer`): q_a, kv_a, q_b, the
    front and the cache write in one launch, then the attention -> [1, 1, H, v]; else None."""
    layer = front_layer(attn, cache, hidden_states.shape[1])
    if layer is None or attn.q_lora_rank is None or hidden_states.shape[0] != 1:
        return None
    x = single_decode_row(hidden_states, attn.q_a_proj, attn.kv_a_proj_with_mqa)  # DecodeLinears without bias
    q_b = attn.q_b_proj
    if x is None or type(q_b) is not DecodeLinear or q_b.bias is not None:
        return None
    norms = (attn.q_a_layernorm.weight, attn.kv_a_layernorm.weight)
    weights = (attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight, q_b.weight)
    if not mla_chain.usable(x, layer.storage, *weights, *norms):
        return None
    cos, sin = position_embeddings  # [1, 1, rope / 2]
    w_uk, _ = attn.absorbed_weights()
    query, lengths = mla_chain.mla_decode_chain(
        x, weights[0], weights[1], norms[0], attn.q_a_layernorm.eps, weights[2], cos[:, 0], sin[:, 0], norms[1],
        attn.kv_a_layernorm.eps, w_uk, layer.storage, layer.cumulative_length, attn.config.rope_interleave,
    )  # fmt: skip
    return joined_query_attention(attn, layer, cache, query, lengths)


def flash_cache_attention(attn, q_nope, q_rope, storage, length, cache: LatentStaticCache, query=None) -> torch.Tensor:
    """`absorbed_cache_attention` for one query token per row through `kernels/flash_mla_decode.py` (`query`: the
    joined query [B, H, 1, r + rope] already made, q_nope and q_rope unused). The first layer of a forward computes
    FlashMLA's split-KV schedule and leaves it on the cache for the other main layers, whose caches hold as many
    tokens (the MTP layers', which may hold fewer, compute their own)."""
    w_uk, w_uv = attn.absorbed_weights()
    if query is None:
        query = absorb_query(q_nope, w_uk, q_rope)  # [B, H, 1, r + rope]
    heads = query.shape[1]
    main_layers = attn.config.num_hidden_layers
    if attn.layer_idx == 0 or attn.layer_idx >= main_layers or cache.flash_schedule is None:
        schedule = flash_mla_schedule(row_lengths(length, storage.shape[0]), heads)
        if attn.layer_idx < main_layers:
            cache.flash_schedule = schedule
    else:
        schedule = cache.flash_schedule
    out_latent = flash_latent_attention(query, storage, length, attn.scaling, schedule).to(query.dtype)
    return values_from_latent(out_latent, w_uv)  # [B, 1, H, v]


def triton_cache_attention(attn, q_nope, q_rope, buffer, length, query=None) -> torch.Tensor:
    """`absorbed_cache_attention` for one query token per row through `kernels/mla_decode_triton.py` (with
    `mla_decode_triton.FUSED`: the roped query read apart and W_UV applied by the kernels themselves; `query`: the
    joined query [B, H, 1, r + rope] already made, q_nope and q_rope unused)."""
    w_uk, w_uv = attn.absorbed_weights()
    rank = attn.kv_lora_rank
    if mla_decode_triton.FUSED:
        if query is None:
            q_latent = absorb_query(q_nope, w_uk)  # [B, H, 1, r]
        else:
            q_latent, q_rope = query[..., :rank], query[..., rank:]
        out = triton_latent_attention(q_latent, buffer, length, attn.scaling, rank, q_rope, w_uv)
        return out.to(q_latent.dtype).transpose(1, 2)  # [B, 1, H, v]
    if query is None:
        query = absorb_query(q_nope, w_uk, q_rope)  # [B, H, 1, r + rope]
    out_latent = triton_latent_attention(query, buffer, length, attn.scaling, rank).to(query.dtype)
    return values_from_latent(out_latent, w_uv)  # [B, 1, H, v]


MAX_SCORES = 2**28  # score elements (fp32: 1 GiB) a chunk of queries may hold; more queries are taken in pieces


def absorbed_cache_attention(attn, q_nope, q_rope, buffer, length, attention_mask) -> torch.Tensor:
    """Absorbed MQA of the last T queries over buffer [B, L, r + rope], whose first `length` (device tensor)
    tokens are written; the query tokens are the last T of those. Returns [B, T, H, v]. The [B, H, T, L] scores of
    a long chunk (chunked prefill of long prompts) are computed for `MAX_SCORES` elements' worth of queries at a
    time: memory grows with the latent cache, not with queries x context."""
    w_uk, w_uv = attn.absorbed_weights()
    bsz, heads, q_len, _ = q_nope.shape
    max_len, rank = buffer.shape[1], attn.kv_lora_rank
    query = absorb_query(q_nope, w_uk, q_rope).to(buffer.dtype)  # [B, H, T, r + rope]
    piece = max(1, MAX_SCORES // (bsz * heads * max_len))
    outputs = []
    for start in range(0, q_len, piece):
        end = min(q_len, start + piece)
        part = query[:, :, start:end].reshape(bsz, heads * (end - start), -1)
        scores = torch.bmm(part, buffer.transpose(1, 2)).view(bsz, heads, end - start, max_len)  # a buffer read
        scores = _mask_scores(scores.float() * attn.scaling, attention_mask, length, start, q_len)
        probs = F.softmax(scores, dim=-1).to(buffer.dtype)
        out = torch.bmm(probs.view(bsz, heads * (end - start), max_len), buffer[..., :rank])  # [B, H*t, r]
        outputs.append(out.view(bsz, heads, end - start, rank))
    out_latent = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)).to(q_nope.dtype)
    return values_from_latent(out_latent, w_uv)  # [B, T, H, v]


def _mask_scores(scores: torch.Tensor, attention_mask, length: torch.Tensor, start: int, q_len: int):
    """scores [B, H, t, L] of queries start..start+t of the T = `q_len` new ones: keep what the mask allows;
    without a 4D mask, causal up to each query's position and never past the written length (a 2D mask [B, >=L]
    adds padding). Masked scores become the dtype's lowest finite value, not -inf: a padding query that may attend
    to nothing (a chunk of a left-padded prompt) then averages the cache rather than turning NaN, which the cache
    would carry to the real tokens (0 x NaN); anywhere else exp() of it is exactly 0, as of -inf."""
    part, max_len = scores.shape[2:]
    lowest = torch.finfo(scores.dtype).min
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        mask = attention_mask[..., :max_len]
        if mask.shape[2] > 1:  # one row per query (else one row for all)
            mask = mask[:, :, start : start + part]
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, lowest)
        return scores + mask
    key_pos = torch.arange(max_len, device=scores.device)
    query_pos = length - q_len + start + torch.arange(part, device=scores.device)
    keep = key_pos[None, :] <= query_pos[:, None]  # [T, L]
    if isinstance(attention_mask, torch.Tensor):  # 2D padding mask [B, S], S <= L: the rest is masked causally
        padding = attention_mask[:, :max_len].bool()
        padding = F.pad(padding, (0, max_len - padding.shape[1]), value=False)
        keep = keep[None, None] & padding[:, None, None, :]
    return scores.masked_fill(~keep, lowest)


__all__ = [
    "absorbed_cache_attention",
    "chain_cache_attention",
    "front_cache_attention",
    "joined_query_attention",
    "latent_cache_attention",
]
