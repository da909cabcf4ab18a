"""Decode attention over the latent cache through FlashMLA's SM90 split-KV kernel (`sgl-flash-mla` on the registry,
imported as `flash_mla`), an optional backend of `modeling/mla_decode.py`, whose torch path it must match.

One query token per row attends, absorbed, over the [B, L, 576] latent-and-rope buffer viewed as pages of 64 tokens
(`LatentCacheLayer` keeps each row's storage a multiple of 64 long): the kernel reads every cached row once, splits
the keys across the GPU's multiprocessors and stops at each row's length, where the torch path runs two batched
matmuls over the whole static buffer. FlashMLA has no padding mask, so it serves only caches whose rows fill
[0, length) (`LatentStaticCache.unpadded`). DeepSeek-V3's dimensions only: kv_lora_rank 512, qk_rope_head_dim 64,
bf16. Whether it can run is decided once, when a cache is allocated (outside traced code); `ENABLED = False`
(or HF_DEEPSEEK_FLASH_MLA=0 in the environment) turns it off for caches allocated afterwards.
"""

import functools
import os

import torch

# HF_DEEPSEEK_FLASH_MLA=0 turns it off; the benchmark turns it off per row to measure the torch path in the same run
ENABLED = os.environ.get("HF_DEEPSEEK_FLASH_MLA", "1") != "0"
PAGE = 64  # tokens per FlashMLA page
LATENT_DIM, ROPE_DIM = 512, 64


@functools.cache
def available(device_index: int = 0) -> bool:
    """Whether FlashMLA's dense SM90 decode kernel can run here (imports it once)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    try:
        import flash_mla
    except (ImportError, OSError):
        return False
    return bool(flash_mla.has_legacy())


def usable(latent_dim: int, rope_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a latent cache with these dimensions can be read by FlashMLA (set-up time, not traced code)."""
    shapes_ok = (latent_dim, rope_dim, dtype) == (LATENT_DIM, ROPE_DIM, torch.bfloat16)
    return ENABLED and shapes_ok and device.type == "cuda" and available(device.index or 0)


@torch.library.custom_op("hf_deepseek::flash_mla_decode", mutates_args=())
def flash_mla_decode(
    query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """query [B, 1, H, 576] bf16, pages [P, 64, 1, 576], block_table [B, L/64] int32, lengths [B] int32 ->
    [B, 1, H, 512]: softmax(scale * q.k) v over each row's first `lengths` tokens, v the keys' first 512 values."""
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata

    out, _ = flash_mla_with_kvcache(
        query, pages, block_table, lengths, LATENT_DIM, get_mla_metadata()[0], softmax_scale=scale, causal=False,
        use_legacy=True,
    )  # fmt: skip
    return out


@flash_mla_decode.register_fake
def _(query, pages, block_table, lengths, scale):
    return query.new_empty(*query.shape[:-1], LATENT_DIM)


def flash_latent_attention(q_latent, q_rope, storage: torch.Tensor, length: torch.Tensor, scale: float):
    """q_latent [B, H, 1, 512], q_rope [B, H, 1, 64], storage [B, L64, 576] (L64 a multiple of 64) whose first
    `length` (device tensor) tokens are written -> the attention output in latent space [B, H, 1, 512]."""
    bsz, pages_per_row = storage.shape[0], storage.shape[1] // PAGE
    query = torch.cat([q_latent, q_rope], dim=-1).transpose(1, 2).to(storage.dtype)  # [B, 1, H, 576]
    pages = storage.view(bsz * pages_per_row, PAGE, 1, storage.shape[-1])
    block_table = torch.arange(bsz * pages_per_row, device=storage.device, dtype=torch.int32).view(bsz, -1)
    lengths = length.to(torch.int32).expand(bsz).contiguous()
    return flash_mla_decode(query.contiguous(), pages, block_table, lengths, scale).transpose(1, 2)


__all__ = ["available", "usable", "flash_latent_attention", "flash_mla_decode", "ENABLED", "PAGE"]
