"""The Triton kernel of `mla_front.py` (imported only where Triton and CUDA exist): everything a decode step's MLA
does between its projections and the attention over the latent cache, in one launch.

Programs (block of BLOCK_N latent outputs, head, block of BLOCK_T rows) fold the query's nope part through the
head's W_UK as `_head_matmul_triton`'s kernel does, with its plan (fp32 sums rounded once), and the first block of
outputs also writes the head's roped query after them: the joined query [B, H, r + rope] the attention kernels read.
One more column of programs (one block past the outputs: a program per head and row block) writes the rows' new
cache entries, the kv latent through its RMSNorm followed by the roped key, at the cache's length, a row a program
(rows head, head + H, ... of its block); the last of them to finish (a counter, `counters.counters`, which it sets
back to zero) counts the token (length + 1), after every writer has read the length; each writer also stores its
rows' new lengths as int32 [B], as the attention kernels take them. The attention kernels launch after this one and
read the entries from the cache.

RoPE takes each rotated pair (x1, x2) at (2i, 2i+1) when INTERLEAVED (DeepSeek's weights) or (i, i + rope/2), and
writes [x1 cos - x2 sin | x2 cos + x1 sin], as `attention.apply_rope`; the norm rounds to kv_a's dtype before the
weight multiplies it, as `moe_gemv.rms_norm`. Arithmetic in fp32, each result rounded once to its output's dtype.
"""

import torch
import triton
import triton.language as tl

from ._head_matmul_triton import plan
from ._moe_grouped_gemv_triton import _tile_product
from ._pdl_triton import pdl_wait
from .counters import counters
from .moe_gemv_config import pdl_arguments


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, HALF, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The rotated halves (fp32, [BLOCK_HALF] each, zero past HALF) of the rope values at x_ptr, one row's cos/sin
    at cos_ptr / sin_ptr."""
    i = tl.arange(0, BLOCK_HALF)
    ok = i < HALF
    first = 2 * i if INTERLEAVED else i
    second = 2 * i + 1 if INTERLEAVED else i + HALF
    x1 = tl.load(x_ptr + first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + second, mask=ok, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + i, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + i, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _front_kernel(
    q_ptr, kv_ptr, cos_ptr, sin_ptr, norm_ptr, wuk_ptr, cache_ptr, len_ptr, sem_ptr, out_ptr, lens_ptr,
    B, H, NOPE, R, HALF, CACHE_LEN, eps,
    stride_qb, stride_qh, stride_kvb, stride_cb, stride_sb, stride_wh, stride_wk, stride_wn, stride_ob, stride_oh,
    stride_cacheb, stride_cachet,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_wait(PDL)  # q, kv_a, the cache and its length: an earlier kernel writes each
    _front_program(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0),
        tl.num_programs(1) * tl.num_programs(2),
        q_ptr, kv_ptr, cos_ptr, sin_ptr, norm_ptr, wuk_ptr, cache_ptr, len_ptr, sem_ptr, out_ptr, lens_ptr,
        B, H, NOPE, R, HALF, CACHE_LEN, eps,
        stride_qb, stride_qh, stride_kvb, stride_cb, stride_sb, stride_wh, stride_wk, stride_wn, stride_ob, stride_oh,
        stride_cacheb, stride_cachet, BLOCK_T, BLOCK_N, BLOCK_K, BLOCK_R, BLOCK_HALF, INTERLEAVED, PRECISION,
    )  # fmt: skip


@triton.jit
def _front_program(
    pid_n, head, pid_t, n_blocks, writers,
    q_ptr, kv_ptr, cos_ptr, sin_ptr, norm_ptr, wuk_ptr, cache_ptr, len_ptr, sem_ptr, out_ptr, lens_ptr,
    B, H, NOPE, R, HALF, CACHE_LEN, eps,
    stride_qb, stride_qh, stride_kvb, stride_cb, stride_sb, stride_wh, stride_wk, stride_wn, stride_ob, stride_oh,
    stride_cacheb, stride_cachet,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The front's work item (block `pid_n` of `n_blocks`, the last being the cache writers', head, row block
    `pid_t`); `writers`: how many writer items the launch has (each counts itself on the semaphore)."""
    if pid_n == n_blocks - 1:  # the cache writers: rows head, head + H, ... of the row block
        pos = tl.load(len_ptr)
        d = tl.arange(0, BLOCK_R)
        d_ok = d < R
        w = tl.load(norm_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        i = tl.arange(0, BLOCK_HALF)
        for j in range(head, BLOCK_T, H):
            b = pid_t * BLOCK_T + j
            if b < B:
                if pos < CACHE_LEN:  # a full cache is never written past its end
                    kv_row = kv_ptr + b * stride_kvb
                    x_in = tl.load(kv_row + d, mask=d_ok, other=0.0)
                    x = x_in.to(tl.float32)
                    normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / R + eps)).to(x_in.dtype).to(tl.float32)
                    entry = cache_ptr + b * stride_cacheb + pos * stride_cachet
                    tl.store(entry + d, (w * normed).to(cache_ptr.dtype.element_ty), mask=d_ok)
                    k1, k2 = _rope(kv_row + R, cos_ptr + b * stride_cb, sin_ptr + b * stride_sb, HALF, BLOCK_HALF,
                                   INTERLEAVED)  # fmt: skip
                    tl.store(entry + R + i, k1.to(cache_ptr.dtype.element_ty), mask=i < HALF)
                    tl.store(entry + R + HALF + i, k2.to(cache_ptr.dtype.element_ty), mask=i < HALF)
                tl.store(lens_ptr + b, (pos + 1).to(tl.int32))  # the row's length, as the attention kernels read it
        tl.debug_barrier()  # every thread's length read done before thread 0's release below
        if tl.atomic_add(sem_ptr, 1, sem="acq_rel", scope="gpu") == writers - 1:  # the last writer: all have read
            tl.store(sem_ptr, 0)  # ready for the next launch
            tl.store(len_ptr, pos + 1)
    else:
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok, n_ok = t < B, n < R
        q_rows = q_ptr + t[:, None] * stride_qb + head * stride_qh
        w_cols = wuk_ptr + head * stride_wh + n[:, None] * stride_wn
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, NOPE, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < NOPE
            a = tl.load(q_rows + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_cols + k[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += _tile_product(a, w, wuk_ptr, False, BLOCK_T >= 16, PRECISION)
        out_rows = out_ptr + t[:, None] * stride_ob + head * stride_oh
        tl.store(out_rows + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])
        if pid_n == 0:  # the roped query after the latent part
            i = tl.arange(0, BLOCK_HALF)
            for j in range(BLOCK_T):
                b = pid_t * BLOCK_T + j
                if b < B:
                    q1, q2 = _rope(q_ptr + b * stride_qb + head * stride_qh + NOPE, cos_ptr + b * stride_cb,
                                   sin_ptr + b * stride_sb, HALF, BLOCK_HALF, INTERLEAVED)  # fmt: skip
                    row = out_ptr + b * stride_ob + head * stride_oh + R
                    tl.store(row + i, q1.to(out_ptr.dtype.element_ty), mask=i < HALF)
                    tl.store(row + HALF + i, q2.to(out_ptr.dtype.element_ty), mask=i < HALF)


def block_sizes(rows: int, heads: int, latent: int, nope: int, rope: int) -> dict:
    """The front's block constexprs for `rows` rows (`_head_matmul_triton.plan`'s tiles for W_UK, the latent and
    half the rope padded to powers of two): what `launch` and the MLA chain's front phase both take."""
    block_t, block_n, block_k = plan(rows, heads, latent, nope)
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=triton.next_power_of_2(latent),
                BLOCK_HALF=triton.next_power_of_2(max(rope // 2, 1)))  # fmt: skip


def launch(q, kv_a, cos, sin, norm_weight, eps: float, w_uk, storage, length, interleaved: bool):
    """q [B, H, nope + rope] and kv_a [B, r + rope] (last dimensions contiguous), cos / sin [B, rope / 2], the kv
    norm's weight [r], W_UK [H, nope, r] (any strides), storage [B, L, r + rope] (last dimension contiguous), length
    (one element, int32 or int64) -> (the joined query [B, H, r + rope] in q's dtype, the rows' new lengths [B]
    int32); storage and length are written as `mla_front.reference` writes them."""
    batch, heads, width = q.shape
    nope, latent = w_uk.shape[1], w_uk.shape[2]
    rope = width - nope
    out = torch.empty(batch, heads, latent + rope, device=q.device, dtype=q.dtype)
    lengths = torch.empty(batch, device=q.device, dtype=torch.int32)
    blocks = block_sizes(batch, heads, latent, nope, rope)
    w_uk = w_uk.to(q.dtype)
    grid = (triton.cdiv(latent, blocks["BLOCK_N"]) + 1, heads, triton.cdiv(batch, blocks["BLOCK_T"]))
    _front_kernel[grid](
        q, kv_a, cos, sin, norm_weight, w_uk, storage, length, counters("mla_front", 1, q.device), out, lengths,
        batch, heads, nope, latent, rope // 2, storage.shape[1], eps,
        q.stride(0), q.stride(1), kv_a.stride(0), cos.stride(0), sin.stride(0), w_uk.stride(0), w_uk.stride(1),
        w_uk.stride(2), out.stride(0), out.stride(1), storage.stride(0), storage.stride(1),
        **blocks, INTERLEAVED=interleaved, PRECISION="ieee" if q.dtype == torch.float32 else None, num_warps=4,
        **pdl_arguments(q.device),
    )  # fmt: skip
    return out, lengths
