"""An FP8 linear layer's decode rows beyond the matrix-vector kernels' `moe_gemv.MAX_LINEAR_ROWS`, up to `MAX_ROWS`:
one weight-only Triton kernel that reads the FP8 weight once for all of the rows.

At decode batch 32 an FP8 model's dense layers (`FP8InferenceLinear`, 32 rows each) quantised the activation rows and
then ran the FP8 blockwise GEMM (cuBLAS `_scaled_mm` or the Triton GEMM): ~770 us a decode step on an H200, against
~430 us for bf16 cuBLAS at the same rows, so FP8 weights, half the bytes, barely paid at batch 32. Here
(`_fp8_rows_triton.py`) a program owns a block of BLOCK_N weight rows and BLOCK_T activation rows; per K step it loads
the e4m3 weight tile once, converts it exactly to the activation's dtype (bf16 and fp16 hold every e4m3 value),
multiplies it against the rows on the tensor cores (`tl.dot`; fewer than 16 rows a program: a broadcast product on
the CUDA cores) and adds the fp32 partial sums times the tile's 128x128 block scale to an fp32 accumulator, which it
stores in x's dtype itself (no conversion kernel after it). The activations stay as they are: no quantisation.

`linear_rows_fp8` is a custom op (one node under torch.compile, captured by CUDA graphs: static grid, no host read):
the Triton kernel on CUDA, the product with the dequantised weight in torch elsewhere (fp32 sums rounded once to
x's dtype, as the kernel stores them; what the CPU tests run). `FP8InferenceLinear.forward` takes it with
`FP8Recipe.weight_only_decode` for more than `MAX_LINEAR_ROWS` and up to `MAX_ROWS` rows (`usable`). Not yet timed
on a GPU; HF_DEEPSEEK_FP8_ROWS_CONFIG sets the launch configuration (`moe_gemv_config.FP8_ROWS_CONFIG`) for tuning
runs.
"""

import torch

from . import moe_gemv
from .fp8_blocks import dequantize_blocks

MAX_ROWS = 64  # rows up to which the kernel serves (batch 64); the FP8 GEMM path above


def usable(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_rows_fp8` serves the rows x2 [T, K] of an FP8 linear layer: beyond the matrix-vector kernels'
    rows (`moe_gemv.MAX_LINEAR_ROWS`), up to `MAX_ROWS`, on their other conditions (set-up time checks only)."""
    return (
        moe_gemv.ENABLED
        and x2.is_cuda
        and moe_gemv.fp8_kernels_available()
        and x2.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == torch.float8_e4m3fn
        and not torch.is_grad_enabled()
        and moe_gemv.MAX_LINEAR_ROWS < x2.shape[0] <= MAX_ROWS
    )


@torch.library.custom_op("hf_deepseek::linear_rows_fp8", mutates_args=())
def linear_rows_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ W^T -> [T, N] in x's dtype, W the FP8 weight [N, K] dequantised by its 128x128 block scales
    [ceil(N/128), ceil(K/128)] (fp32 sums, rounded once to x's dtype)."""
    if not x.is_cuda:
        return (x.float() @ dequantize_blocks(weight, scale).T).to(x.dtype)
    from ._fp8_rows_triton import launch

    return launch(x, weight, scale)


@linear_rows_fp8.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


__all__ = ["linear_rows_fp8", "usable", "MAX_ROWS"]
