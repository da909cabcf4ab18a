"""Decode attention over the latent cache through a Triton split-KV kernel (`_mla_decode_triton.py`), an optional
backend of `modeling/mla_decode.py` for one query token per row over an unpadded cache (the default for up to 8 rows;
HF_DEEPSEEK_DECODE_ATTENTION=triton for any batch).

FlashMLA's decode spends ~22 us per layer at batch 1 in three launches (schedule, split-KV, combine) to read 2.4 MB;
this one launches two kernels, needs no schedule and reads each row only up to its length. `mla_decode_triton` is a
custom op (one node under torch.compile, replayed by CUDA graphs): the kernels on CUDA, the same computation in torch
elsewhere (`reference`), which is what the CPU tests run.
"""

import os

import torch

from .moe_gemv import triton_available


def parse_plan(text: str | None) -> tuple[int, int]:
    """ "BLOCK_T,TARGET_PROGRAMS" (HF_DEEPSEEK_MLA_TRITON_PLAN: cache tokens a tile, a power of two >= 16, and about
    how many split programs to run) -> the kernels' plan; None or "" -> the defaults (64, 256), the fastest of
    `benchmarks/decode_attention_bench.py --sweep` at batch 1 and 8 x 2k on an H200 (9.8 / 12.2 us a layer against
    11.6 / 16.9 at (32, 128); docs/PERF.md, 2026-12-05)."""
    if not text or not text.strip():
        return 64, 256
    form = "BLOCK_T,TARGET_PROGRAMS (BLOCK_T a power of two >= 16, TARGET_PROGRAMS >= 1)"
    try:
        block_t, target = (int(f) for f in text.split(","))
    except ValueError:
        raise ValueError(f"HF_DEEPSEEK_MLA_TRITON_PLAN: expected {form}, got {text!r}") from None
    if block_t < 16 or block_t & (block_t - 1) or target < 1:
        raise ValueError(f"HF_DEEPSEEK_MLA_TRITON_PLAN: expected {form}, got {text!r}")
    return block_t, target


PLAN = parse_plan(os.environ.get("HF_DEEPSEEK_MLA_TRITON_PLAN"))  # (BLOCK_T, TARGET_PROGRAMS) of the kernels
# the model passes the roped query apart (no join kernel before the split kernel) and W_UV to the combine kernel (no
# batched matmul after it): two launches fewer a layer, on by default with the other launch-saving kernels
# (`moe_gemv.FUSED_NORM_LINEAR`'s note); HF_DEEPSEEK_MLA_TRITON_FUSED=0 turns it off
FUSED = os.environ.get("HF_DEEPSEEK_MLA_TRITON_FUSED", "1") != "0"


def usable(latent_dim: int, rope_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels serve a cache of these dimensions on `device` (set-up time, not traced code)."""
    pow2 = latent_dim & (latent_dim - 1) == 0 and rope_dim & (rope_dim - 1) == 0 and rope_dim >= 16
    return device.type == "cuda" and triton_available() and pow2 and dtype in (torch.bfloat16, torch.float16)


def reference(query, storage, lengths, scale: float, latent_dim: int, query_rope=None, w_uv=None) -> torch.Tensor:
    """The kernels' computation in torch (fp32): query [B, H, r + rope] (or [B, H, r] and `query_rope` [B, H, rope]),
    storage [B, L, r + rope], lengths [B] -> softmax(scale * q.k) v over each row's first `lengths` tokens, v the
    keys' first r values: [B, H, r] in storage's dtype; with `w_uv` [H, v, r] that output through each head's
    W_UV: [B, H, v]."""
    if query_rope is not None:
        query = torch.cat([query.to(storage.dtype), query_rope.to(storage.dtype)], dim=-1)
    scores = torch.bmm(query.float(), storage.float().transpose(1, 2)) * scale  # [B, H, L]
    keep = torch.arange(storage.shape[1], device=storage.device)[None, :] < lengths[:, None].to(storage.device)
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of length 0 gives 0
    out = torch.bmm(probs, storage[..., :latent_dim].float()).to(storage.dtype)
    if w_uv is None:
        return out
    return torch.einsum("bhr,hvr->bhv", out.float(), w_uv.to(storage.dtype).float()).to(storage.dtype)


@torch.library.custom_op("hf_deepseek::mla_decode_triton", mutates_args=())
def mla_decode_triton(
    query: torch.Tensor,
    storage: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    latent_dim: int,
    query_rope: torch.Tensor | None = None,
    w_uv: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, H, r + rope] (the absorbed query joined with its roped part; or [B, H, r] and `query_rope`
    [B, H, rope]), storage [B, L, r + rope], lengths [B] int32 (device) -> [B, H, r] in storage's dtype: absorbed
    attention over each row's first `lengths` tokens; with `w_uv` [H, v, r], through each head's W_UV: [B, H, v]."""
    if not query.is_cuda:
        return reference(query, storage, lengths, scale, latent_dim, query_rope, w_uv)
    from ._mla_decode_triton import launch

    return launch(query, storage, lengths.to(torch.int32), scale, latent_dim, *PLAN, query_rope=query_rope, w_uv=w_uv)


@mla_decode_triton.register_fake
def _(query, storage, lengths, scale, latent_dim, query_rope=None, w_uv=None):
    return storage.new_empty(query.shape[0], query.shape[1], latent_dim if w_uv is None else w_uv.shape[1])


def triton_latent_attention(query: torch.Tensor, storage: torch.Tensor, length: torch.Tensor, scale: float,
                            latent_dim: int, query_rope=None, w_uv=None) -> torch.Tensor:  # fmt: skip
    """query [B, H, 1, r + rope] (the absorbed query joined with its roped part; or [B, H, 1, r] and `query_rope`
    [B, H, 1, rope]), storage [B, L, r + rope] whose first `length` (device tensor, one for all rows, or [B]) tokens
    are written -> the attention output in latent space [B, H, 1, r], r = `latent_dim`, or with `w_uv` [H, v, r]
    through each head's W_UV: [B, H, 1, v]."""
    bsz = storage.shape[0]
    lengths = length.to(torch.int32).expand(bsz).contiguous()
    rope = None if query_rope is None else query_rope.squeeze(2)
    out = mla_decode_triton(query.squeeze(2).to(storage.dtype), storage, lengths, scale, latent_dim, rope, w_uv)
    return out.unsqueeze(2)


__all__ = ["FUSED", "PLAN", "mla_decode_triton", "parse_plan", "reference", "triton_latent_attention", "usable"]
