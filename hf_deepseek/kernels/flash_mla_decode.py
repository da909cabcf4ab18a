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


@functools.cache
def multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@torch.library.custom_op("hf_deepseek::flash_mla_schedule", mutates_args=())
def flash_mla_schedule(lengths: torch.Tensor, query_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's split-KV schedule for rows of `lengths` [B] int32 keys and `query_heads` query heads over one
    latent head: (tile metadata [parts, 8] int32, split offsets [B + 1] int32). One per decode step, shared by the
    layers (every layer's cache holds the same lengths), instead of one scheduler kernel per layer."""
    from flash_mla import get_mla_decoding_metadata

    schedule, splits = get_mla_decoding_metadata(lengths, query_heads, 1, query_heads, use_legacy=True)
    return schedule, splits


@flash_mla_schedule.register_fake
def _(lengths, query_heads):
    # FlashMLA's scheduler: one part per group of multiprocessors serving 64 query heads each (elsewhere, where only
    # an emulation runs, any count)
    sms = multiprocessors(lengths.device.index or 0) if lengths.device.type == "cuda" else 4
    parts = sms // -(-query_heads // 64)
    return lengths.new_empty(parts, 8), lengths.new_empty(lengths.shape[0] + 1)


@torch.library.custom_op("hf_deepseek::flash_mla_decode", mutates_args=())
def flash_mla_decode(
    query: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
    schedule: torch.Tensor, splits: torch.Tensor, scale: float,
) -> torch.Tensor:  # fmt: skip
    """query [B, 1, H, 576] bf16, pages [P, 64, 1, 576], block_table [B, L/64] int32, lengths [B] int32, the
    schedule of `flash_mla_schedule` -> [B, 1, H, 512]: softmax(scale * q.k) v over each row's first `lengths`
    tokens, v the keys' first 512 values."""
    from flash_mla import flash_mla_with_kvcache
    from flash_mla.flash_mla_interface import FlashMLASchedMeta

    meta = FlashMLASchedMeta(tile_scheduler_metadata=schedule, num_splits=splits)
    out, _ = flash_mla_with_kvcache(
        query, pages, block_table, lengths, LATENT_DIM, meta, softmax_scale=scale, causal=False, use_legacy=True
    )
    return out


@flash_mla_decode.register_fake
def _(query, pages, block_table, lengths, schedule, splits, scale):
    return query.new_empty(*query.shape[:-1], LATENT_DIM)


def row_lengths(length: torch.Tensor, batch: int) -> torch.Tensor:
    """The cache's written length (a device scalar, or the rows' lengths [B]) as FlashMLA's per-row lengths [B]
    int32 (no copy when given so already)."""
    return length.to(torch.int32).expand(batch).contiguous()


def flash_latent_attention(query, storage: torch.Tensor, length: torch.Tensor, scale: float, schedule=None):
    """query [B, H, 1, 576] (the absorbed query joined with its roped part), storage [B, L64, 576] (L64 a multiple
    of 64) whose first `length` (device tensor) tokens are written -> the attention output in latent space
    [B, H, 1, 512]. `schedule`: `flash_mla_schedule`'s for these lengths and heads, computed here if not given."""
    bsz, heads, pages_per_row = storage.shape[0], query.shape[1], storage.shape[1] // PAGE
    query = query.transpose(1, 2).to(storage.dtype)  # [B, 1, H, 576]
    pages = storage.view(bsz * pages_per_row, PAGE, 1, storage.shape[-1])
    block_table = torch.arange(bsz * pages_per_row, device=storage.device, dtype=torch.int32).view(bsz, -1)
    lengths = row_lengths(length, bsz)
    schedule = flash_mla_schedule(lengths, heads) if schedule is None else schedule
    return flash_mla_decode(query.contiguous(), pages, block_table, lengths, *schedule, scale).transpose(1, 2)


__all__ = [
    "available", "usable", "flash_latent_attention", "flash_mla_decode", "flash_mla_schedule", "row_lengths", "ENABLED",
    "PAGE",
]  # fmt: skip
