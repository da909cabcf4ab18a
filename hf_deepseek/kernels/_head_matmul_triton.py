"""The Triton kernel of `head_matmul.py` (imported only where Triton and CUDA exist): x [T, H, K] @ w [H, K, N] per
head for a few decode rows, w any strided view (W_UK's [H, nope, r] rows or W_UV's [H, v, r] transposed).

A program owns (block of BLOCK_N outputs, one head, block of BLOCK_T rows); the grid (N / BLOCK_N, H, T / BLOCK_T)
is fixed by the shapes, so a CUDA graph replays it. Per K step it loads the head's weight tile once as [BLOCK_N,
BLOCK_K] through its strides and `_moe_grouped_gemv_triton._tile_product` applies it to the rows (16 or more: a
tensor-core `tl.dot`, rows past T masked to zero; fewer: a broadcast multiply and sum). fp32 sums, stored in x's
dtype by the kernel itself (rounded once). BLOCK_N is sized so that about one program runs per multiprocessor. An
optional tail (the query's roped part) is copied into the output's last columns by the first block of outputs, so
the absorbed query comes out joined with it, in the layout the decode attention kernels read: no concatenation
kernel after it."""

import torch
import triton
import triton.language as tl

from ._moe_grouped_gemv_triton import _tile_product

TARGET_PROGRAMS = 128  # about one per H200 multiprocessor (132)
BROADCAST_ELEMENTS = 8192  # BLOCK_T * BLOCK_N * BLOCK_K of a broadcast product: ~64 fp32 registers a thread at 4 warps


@triton.jit
def _head_kernel(
    x_ptr, w_ptr, tail_ptr, out_ptr, T, N, K, R, stride_xt, stride_xh, stride_wh, stride_wk, stride_wn, stride_rt,
    stride_rh, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out[t, h, n] = sum_k x[t, h, k] * w[h, k, n] for a block of n (program_id(0)), head h (program_id(1)) and a
    block of t (program_id(2)); x's last dimension contiguous, out contiguous [T, H, N + R], whose last R columns
    the programs of the first block of n copy from tail [T, H, R] (R = 0: no tail; tail's last dimension
    contiguous)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    head = tl.program_id(1)
    heads = tl.num_programs(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_ok, t_ok = n < N, t < T
    width = N + R
    if R > 0:  # noqa: SIM102 (Triton: a runtime condition under a constant one)
        if tl.program_id(0) == 0:
            r = tl.arange(0, BLOCK_R)
            keep = t_ok[:, None] & (r < R)[None, :]
            part = tl.load(tail_ptr + t[:, None] * stride_rt + head * stride_rh + r[None, :], mask=keep, other=0.0)
            tl.store(out_ptr + (t[:, None] * heads + head) * width + N + r[None, :], part, mask=keep)
    x_rows = x_ptr + t[:, None] * stride_xt + head * stride_xh
    w_cols = w_ptr + head * stride_wh + n[:, None] * stride_wn
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _tile_product(a, w, w_ptr, False, BLOCK_T >= 16, PRECISION)
    out = out_ptr + (t[:, None] * heads + head) * width + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


def plan(rows: int, heads: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_K): 16 rows a program (tensor cores) from 9 rows on, else the rows rounded up to a
    power of two; BLOCK_N between 16 and 128, about `TARGET_PROGRAMS` programs; BLOCK_K up to 128 (a broadcast
    product within `BROADCAST_ELEMENTS`)."""
    block_t = 16 if rows > 8 else triton.next_power_of_2(rows)
    blocks = heads * triton.cdiv(rows, block_t)
    block_n = min(128, max(16, triton.next_power_of_2(triton.cdiv(n * blocks, TARGET_PROGRAMS))))
    if triton.cdiv(n, block_n) * blocks < TARGET_PROGRAMS // 2:  # too few programs: split n finer
        block_n = max(16, block_n // 2)
    block_k = min(128, max(16, triton.next_power_of_2(k)))
    if block_t < 16:
        block_k = min(block_k, max(16, BROADCAST_ELEMENTS // (block_t * block_n)))
    return block_t, block_n, block_k


def launch(
    x: torch.Tensor, w: torch.Tensor, tail: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """x [T, H, K] (bf16, fp16 or fp32), w [H, K, N] in x's dtype (any strides) -> [T, H, N] in x's dtype, or with
    `tail` [T, H, R] (x's dtype) [T, H, N + R], tail in the last R columns. `blocks`: (BLOCK_T, BLOCK_N, BLOCK_K),
    by default `plan`'s."""
    (rows, heads, k), n = x.shape, w.shape[2]
    if tuple(w.shape[:2]) != (heads, k):
        raise ValueError(f"x {list(x.shape)} needs a [{heads}, {k}, N] weight, got {list(w.shape)}")
    if tail is not None and tuple(tail.shape[:2]) != (rows, heads):
        raise ValueError(f"x {list(x.shape)} needs a [{rows}, {heads}, R] tail, got {list(tail.shape)}")
    width = tail.shape[2] if tail is not None else 0
    out = torch.empty(rows, heads, n + width, device=x.device, dtype=x.dtype)
    if rows == 0 or n == 0 or heads == 0:
        if width:
            out[..., n:] = tail
        return out
    if x.stride(2) != 1:
        x = x.contiguous()
    if tail is not None and tail.stride(2) != 1:
        tail = tail.contiguous()
    tail_strides = (tail.stride(0), tail.stride(1)) if tail is not None else (0, 0)
    block_t, block_n, block_k = blocks or plan(rows, heads, n, k)
    _head_kernel[(triton.cdiv(n, block_n), heads, triton.cdiv(rows, block_t))](
        x, w, x if tail is None else tail, out, rows, n, k, width, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        w.stride(2), *tail_strides, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=triton.next_power_of_2(max(width, 1)), PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=4,
    )  # fmt: skip
    return out
