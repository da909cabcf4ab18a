"""A decode step's MLA front in one launch (on by default, HF_DEEPSEEK_MLA_FRONT=0 turns it off): from the
query projection's and kv_a's outputs to the joined query the latent-cache attention kernels read, with the new
token's cache entry written on the way.

Without it, the eager ops between kv_a / q_b and the attention kernel compile to seven launches a layer on an H100
at batch 1 (the roped query, W_UK's batched matmul, the join, the kv norm, the roped key, the cache write and the
length's increment: 11.6 us of kernels a layer plus their gaps, `docs/decode-h100/profile_ours-fast_b1_c2048_*`),
each reading a few KB. `mla_decode_front` is a custom op that writes the cache storage and its length and returns
the rows' lengths as the attention kernels take them (no conversion launch after it; one node under torch.compile,
captured by CUDA graphs): the kernel (`_mla_front_triton.py`) on CUDA, the same computation in
torch elsewhere (`reference`, what the CPU tests run).
"""

import os

import torch

from .moe_gemv import rms_norm, triton_available

ENABLED = os.environ.get("HF_DEEPSEEK_MLA_FRONT", "1") != "0"
# rows up to which the kernel serves: every decode batch. A model's decode through it gives the path's logits row by
# row at 1, 4 and 32 rows on an H100, and batch 32 / 2k took 3.87 against 3.93 ms a step with it at one row only
# (H100, 2026-12-06e); HF_DEEPSEEK_MLA_FRONT_ROWS lowers it
MAX_ROWS = int(os.environ.get("HF_DEEPSEEK_MLA_FRONT_ROWS", "256"))


def usable(q: torch.Tensor, kv_a: torch.Tensor, storage: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors (set-up time checks): switched on, CUDA with Triton, bf16 or fp16, at
    most MAX_ROWS rows."""
    half = (torch.bfloat16, torch.float16)
    dtypes_ok = q.dtype in half and kv_a.dtype in half and storage.dtype in half
    return ENABLED and q.is_cuda and triton_available() and dtypes_ok and q.shape[0] <= MAX_ROWS


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [..., rope] rotated by cos / sin [..., rope / 2] (broadcast over x's middle dimensions) in fp32, laid out
    [x1 cos - x2 sin | x2 cos + x1 sin]: `attention.apply_rope` with one rounding, in x's dtype."""
    x32, cos, sin = x.float(), cos.float(), sin.float()
    x1, x2 = (x32[..., 0::2], x32[..., 1::2]) if interleaved else x32.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def reference(q, kv_a, cos, sin, norm_weight, eps: float, w_uk, storage, length, interleaved: bool):
    """The kernel's computation in torch: q [B, H, nope + rope], kv_a [B, r + rope], cos / sin [B, rope / 2], the kv
    norm's weight [r], W_UK [H, nope, r], storage [B, L, r + rope], length (one element) -> (the joined query
    [B, H, r + rope]: q's nope part through W_UK, fp32 sums rounded once, its roped part after it; the rows' new
    lengths [B] int32, as the attention kernels take them). Writes [RMSNorm(latent) | roped key] at position
    `length` of every row of storage, then adds 1 to length."""
    nope, latent = w_uk.shape[1], w_uk.shape[2]
    q_latent = torch.einsum("bhk,hkr->bhr", q[..., :nope].float(), w_uk.float()).to(q.dtype)
    q_rope = rope_pairs(q[..., nope:], cos[:, None], sin[:, None], interleaved)
    k_rope = rope_pairs(kv_a[:, latent:], cos, sin, interleaved)
    entry = torch.cat([rms_norm(kv_a[:, :latent], norm_weight, eps), k_rope], dim=-1)
    storage.index_copy_(1, length.reshape(1).long(), entry[:, None].to(storage.dtype))
    length.add_(1)
    lengths = length.reshape(1).to(torch.int32).expand(q.shape[0]).contiguous()
    return torch.cat([q_latent, q_rope], dim=-1), lengths


@torch.library.custom_op("hf_deepseek::mla_decode_front", mutates_args=("storage", "length"))
def mla_decode_front(
    q: torch.Tensor,
    kv_a: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    w_uk: torch.Tensor,
    storage: torch.Tensor,
    length: torch.Tensor,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference`'s results and writes, in one launch of `_mla_front_triton._front_kernel` on CUDA."""
    if cos.shape[0] != q.shape[0] or sin.shape[0] != q.shape[0]:  # the kernel reads row b's at b * stride
        raise ValueError(f"mla_decode_front needs cos and sin for each of the {q.shape[0]} rows, got {list(cos.shape)}")
    if not q.is_cuda:
        return reference(q, kv_a, cos, sin, norm_weight, eps, w_uk, storage, length, interleaved)
    from ._mla_front_triton import launch

    return launch(q, kv_a, cos, sin, norm_weight, eps, w_uk, storage, length, interleaved)


@mla_decode_front.register_fake
def _(q, kv_a, cos, sin, norm_weight, eps, w_uk, storage, length, interleaved):
    query = q.new_empty(q.shape[0], q.shape[1], w_uk.shape[2] + q.shape[2] - w_uk.shape[1])
    return query, q.new_empty(q.shape[0], dtype=torch.int32)


__all__ = ["ENABLED", "MAX_ROWS", "mla_decode_front", "reference", "rope_pairs", "usable"]
