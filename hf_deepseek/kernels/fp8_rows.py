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
on a GPU; HF_DEEPSEEK_FP8_ROWS_CONFIG sets the launch configuration (`CONFIG`) for tuning runs.
"""

import os
from typing import NamedTuple

import torch

from . import moe_gemv
from .fp8_blocks import dequantize_blocks
from .moe_gemv_config import config_from_env

MAX_ROWS = 64  # rows up to which the kernel serves (batch 64); the FP8 GEMM path above
CONFIG_ENV = "HF_DEEPSEEK_FP8_ROWS_CONFIG"
_FORM = "BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES]"


class RowsConfig(NamedTuple):
    """The kernel's launch configuration (`_fp8_rows_triton.launch`'s `config`): activation rows per program (16 or
    more: tensor-core `tl.dot`, whose smallest tile has 16 rows; fewer: a broadcast multiply and sum on the CUDA
    cores), weight rows per program, K per loop step, warps and software pipelining stages of the K loop (None:
    Triton's default loop). BLOCK_N and BLOCK_K divide 128: each step's weight tile lies in one 128x128 block, its
    scale one number."""

    block_t: int
    block_n: int
    block_k: int
    warps: int
    stages: int | None = None


def rows_config(config=None) -> RowsConfig:
    """A tuple (BLOCK_T, BLOCK_N, BLOCK_K, WARPS[, STAGES]) or RowsConfig, or None for `CONFIG`, checked: powers of
    two, BLOCK_N and BLOCK_K dividing 128, both at least 16 for tl.dot (BLOCK_T >= 16), STAGES None or >= 1."""
    cfg = RowsConfig(*(CONFIG if config is None else config))
    for name in ("block_t", "block_n", "block_k", "warps"):
        value = getattr(cfg, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"fp8_rows config: {name} must be a power of two, got {value}")
    if 128 % cfg.block_n or 128 % cfg.block_k:
        raise ValueError(
            f"fp8_rows config: BLOCK_N and BLOCK_K must divide the 128x128 scale blocks, got {cfg.block_n} and "
            f"{cfg.block_k}"
        )
    if cfg.block_t >= 16 and min(cfg.block_n, cfg.block_k) < 16:
        raise ValueError(
            f"fp8_rows config: tl.dot (BLOCK_T >= 16) needs BLOCK_N and BLOCK_K >= 16, got {cfg.block_n} and "
            f"{cfg.block_k}"
        )
    if cfg.stages is not None and cfg.stages < 1:
        raise ValueError(f"fp8_rows config: STAGES must be none or >= 1, got {cfg.stages}")
    return cfg


def parse_config(text: str | None) -> RowsConfig | None:
    """ "BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES]" (as HF_DEEPSEEK_FP8_ROWS_CONFIG gives it; STAGES "none" or left
    out: Triton's default loop) -> RowsConfig, checked; None or "" -> None."""
    if not text or not text.strip():
        return None
    fields = [f.strip() for f in text.split(",")]
    try:
        if len(fields) not in (4, 5):
            raise ValueError
        values = [None if i == 4 and f.lower() == "none" else int(f) for i, f in enumerate(fields)]
    except ValueError:
        raise ValueError(f"{CONFIG_ENV}: expected {_FORM} (integers, STAGES may be none), got {text!r}") from None
    return rows_config(tuple(values))


# Not yet timed on a GPU: 32 rows a program (a decode batch of 32 in one tl.dot tile), 16 weight rows a program (96
# to 192 programs for N = 1536..3072 on the H200's 132 SMs), a 128-wide K step (one scale block), a 3-stage
# pipelined K loop. HF_DEEPSEEK_FP8_ROWS_CONFIG sets it as "BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES]".
UNTUNED = RowsConfig(32, 16, 128, 4, 3)
CONFIG: RowsConfig = config_from_env(os.environ, default=UNTUNED, names=(CONFIG_ENV,), parse=parse_config)


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


__all__ = [
    "linear_rows_fp8", "usable", "rows_config", "parse_config", "RowsConfig", "CONFIG", "UNTUNED", "MAX_ROWS",
    "CONFIG_ENV",
]  # fmt: skip
