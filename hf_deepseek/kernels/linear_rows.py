"""A linear layer's few dozen decode rows through one Triton kernel that reads the weight once for all of them: FP8
weights beyond the matrix-vector kernels' `moe_gemv.MAX_LINEAR_ROWS`, bf16 weights (opt-in) beyond their one row,
up to `MAX_ROWS`.

At decode batch 32 an H200 spent ~430 us a step in cuBLAS's bf16 products of the dense layers (~590 MB of weights,
about 1.3 TB/s), and an FP8 model ~770 us (the activation rows quantised, then the FP8 blockwise GEMM), so FP8
weights, half the bytes, barely paid (docs/PERF.md, 2026-12-04h). Here (`_linear_rows_triton.py`) a program owns a
block of BLOCK_N weight rows and BLOCK_T activation rows; per K step it loads the weight tile once (FP8: converted
exactly to the activation's dtype, which holds every e4m3 value), multiplies it against the rows on the tensor cores
(`tl.dot`; fewer than 16 rows a program: a broadcast product on the CUDA cores) and adds the fp32 partial sums (FP8:
times the tile's 128x128 block scale) to an fp32 accumulator, which it stores in x's dtype itself (no conversion
kernel after it). The activations stay as they are: no quantisation.

`linear_rows` (bf16 weights) and `linear_rows_fp8` are custom ops (one node under torch.compile, captured by CUDA
graphs: static grid, no host read): the Triton kernel on CUDA, the product in torch elsewhere (fp32 sums rounded once
to x's dtype, as the kernel stores them; what the CPU tests run). `FP8InferenceLinear.forward` takes the FP8 one with
`FP8Recipe.weight_only_decode` (`usable_fp8`); `DecodeLinear` the bf16 one with HF_DEEPSEEK_LINEAR_ROWS=1 (`usable`),
opt-in: slower than cuBLAS for bf16 at 32 rows on an H200 (a step's dense layers 401 us against 309, the batch-32
step 3.42 ms against 3.25; FP8 weights 412 us against the FP8 GEMM path's 813; docs/PERF.md 2026-12-05).
HF_DEEPSEEK_LINEAR_ROWS_CONFIG (and ..._FP8_CONFIG) set the launch configuration for tuning runs
(`benchmarks/moe_gemv_tune.py --linear-rows`).
"""

import os

import torch
import torch.nn.functional as F

from . import moe_gemv

MAX_ROWS = 64  # rows up to which the kernel serves (batch 64); cuBLAS or the FP8 GEMM path above
BF16 = os.environ.get("HF_DEEPSEEK_LINEAR_ROWS", "0") == "1"  # bf16 weights too (opt-in: slower than cuBLAS)


def usable(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_rows` serves the rows x2 [T, K] of a bf16 linear layer (with HF_DEEPSEEK_LINEAR_ROWS=1):
    beyond the matrix-vector kernel's rows (`moe_gemv.MAX_BF16_LINEAR_ROWS`), up to `MAX_ROWS`."""
    bf16, most = torch.bfloat16, moe_gemv.MAX_BF16_LINEAR_ROWS
    return BF16 and moe_gemv.decode_rows(x2, weight, (bf16,), bf16, False, most, MAX_ROWS)


def usable_fp8(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_rows_fp8` serves the rows x2 [T, K] of an FP8 linear layer: beyond the matrix-vector kernels'
    rows (`moe_gemv.MAX_LINEAR_ROWS`), up to `MAX_ROWS`, on their other conditions (set-up time checks only)."""
    half = (torch.bfloat16, torch.float16)
    return moe_gemv.decode_rows(x2, weight, half, torch.float8_e4m3fn, True, moe_gemv.MAX_LINEAR_ROWS, MAX_ROWS)


@torch.library.custom_op("hf_deepseek::linear_rows", mutates_args=())
def linear_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T -> [T, N] in x's dtype (bf16 weight, fp32 sums rounded once to x's dtype)."""
    if not x.is_cuda:
        return F.linear(x.float(), weight.float()).to(x.dtype)
    from ._linear_rows_triton import launch

    return launch(x, weight)


@linear_rows.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("hf_deepseek::linear_rows_fp8", mutates_args=())
def linear_rows_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ W^T -> [T, N] in x's dtype, W the FP8 weight [N, K] dequantised by its 128x128 block scales
    [ceil(N/128), ceil(K/128)] (fp32 sums, rounded once to x's dtype)."""
    if not x.is_cuda:
        return moe_gemv.fp8_product(x, weight, scale)
    from ._linear_rows_triton import launch

    return launch(x, weight, scale)


@linear_rows_fp8.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


__all__ = ["linear_rows", "linear_rows_fp8", "usable", "usable_fp8", "MAX_ROWS", "BF16"]
