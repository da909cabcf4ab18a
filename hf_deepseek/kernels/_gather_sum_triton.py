"""Triton kernel of `gather_sum.py` (imported only where Triton runs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = (4, 1024)  # (tokens, columns) of a program: 4096 elements of each of a token's k source rows, 16 a thread


@triton.jit
def _gather_sum_kernel(
    src_ptr, idx_ptr, w_ptr, out_ptr, N, D, s_src, s_out,
    K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[t] = sum over k < K of src[idx[t * K + k]] (times w[t, k] taken in src's dtype, each product rounded to
    it, with WEIGHTED), summed in float32 in the order of k, rounded to out's dtype: whole rows of src gathered,
    so each load is contiguous."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_tokens = tokens < N
    mask = in_tokens[:, None] & (cols < D)[None, :]
    dtype = src_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(idx_ptr + tokens * K + k, mask=in_tokens, other=0).to(tl.int64)
        v = tl.load(src_ptr + row[:, None] * s_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(w_ptr + tokens * K + k, mask=in_tokens, other=0.0).to(dtype).to(tl.float32)
            v = (v * w[:, None]).to(dtype).to(tl.float32)
        acc += v
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * s_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


def gather_sum_triton(src: torch.Tensor, rows: torch.Tensor, top_k: int, weights: torch.Tensor | None = None):
    """`gather_sum.gather_sum_reference`: out [N, d] (src's dtype), out[t] = sum over k of src[rows[t * top_k + k]]
    (times weights[t, k] in src's dtype, each product rounded to it), summed in float32 in the order of k."""
    src = src if src.stride(-1) == 1 else src.contiguous()
    tokens, hidden = rows.shape[0] // top_k, src.shape[1]
    out = torch.empty(tokens, hidden, dtype=src.dtype, device=src.device)
    block_t, block_d = BLOCK
    w = weights.contiguous() if weights is not None else rows  # (an unread pointer when unweighted)
    _gather_sum_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_d))](
        src, rows, w, out, tokens, hidden, src.stride(0), out.stride(0),
        K=top_k, WEIGHTED=weights is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8,
    )  # fmt: skip
    return out
