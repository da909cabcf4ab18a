"""The Triton kernel of `linear_rows.py` (imported only where Triton and CUDA exist): x [T, K] @ W^T for a few dozen
decode rows, W a bf16 weight [N, K] or an FP8 one (e4m3) with DeepSeek's 128x128 block scales, read once per call.

A program owns (block of BLOCK_N weight rows, block of BLOCK_T activation rows); the grid is (N / BLOCK_N,
T / BLOCK_T), fixed by the shapes, so a CUDA graph replays it. Per K step the program loads the weight tile once and
`_moe_grouped_gemv_triton._tile_product` applies it to the BLOCK_T rows: converted exactly to x's dtype, with
BLOCK_T >= 16 as a tensor-core `tl.dot` (rows past T masked to zero), with fewer as a broadcast multiply and sum;
with FP8 weights the step's fp32 partial sums times the tile's block scale are added to the fp32 accumulator
(BLOCK_N and BLOCK_K divide 128, so a tile lies in one block). The kernel stores x's dtype itself: its fp32 sums
rounded once, as `.to()` rounds them. No split-K: every output is one program's sum, deterministic."""

import torch
import triton
import triton.language as tl

from ._moe_grouped_gemv_triton import _tile_product
from .moe_gemv_config import launch_options, linear_rows_config


@triton.jit
def _rows_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, T, N, K, G_K,
    SCALED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[t, n] = sum_k x[t, k] * w[n, k] (SCALED: q[n, k] * scale[n // 128, k // 128]) for a block of n
    (program_id(0)) and of t (program_id(1)); partial blocks of n, t and k masked (K need not be a multiple of 128)."""
    n0 = tl.program_id(0) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < N
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K  # N * K may pass 2^31 for the largest layers
    x_rows = x_ptr + t[:, None] * K
    s = s_ptr + (n0 // 128) * G_K  # the rows' block of scales
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _tile_product(a, w, s + k0 // 128, SCALED, BLOCK_T >= 16, PRECISION)
    out = out_ptr + t[:, None] * N + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


def launch(x, weight, scale=None, config=None) -> torch.Tensor:
    """x [T, K] (bf16, fp16 or fp32), weight [N, K] in x's dtype, or float8_e4m3fn with its `scale`
    [ceil(N/128), ceil(K/128)] -> [T, N] in x's dtype. `config`: a `moe_gemv_config.GroupedConfig` or tuple
    (BLOCK_T, BLOCK_N, BLOCK_K, WARPS[, STAGES]), by default `moe_gemv_config.LINEAR_ROWS_CONFIG`
    (`LINEAR_ROWS_FP8_CONFIG` with a scale)."""
    scaled = scale is not None
    block_t, block_n, block_k, warps, stages = linear_rows_config(config, fp8=scaled)
    (rows, k), n = x.shape, weight.shape[0]
    grid_ok = not scaled or tuple(scale.shape) == (triton.cdiv(n, 128), triton.cdiv(k, 128))
    if weight.shape[1] != k or not grid_ok:
        grid = f" and a {list(scale.shape)} scale grid (wants [ceil(N/128), ceil(K/128)])" if scaled else ""
        raise ValueError(f"x {list(x.shape)} needs a [N, {k}] weight, got {list(weight.shape)}{grid}")
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0 or n == 0:
        return out
    x, weight = x.contiguous(), weight.contiguous()
    scale = scale.float().contiguous() if scaled else weight  # unread without SCALED
    _rows_kernel[(triton.cdiv(n, block_n), triton.cdiv(rows, block_t))](
        x, weight, scale, out, rows, n, k, triton.cdiv(k, 128), SCALED=scaled, BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_K=block_k, STAGES=stages, PRECISION="ieee" if x.dtype == torch.float32 else None,
        **launch_options(warps, stages),
    )  # fmt: skip
    return out
