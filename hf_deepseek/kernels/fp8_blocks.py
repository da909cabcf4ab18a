"""DeepSeek's 128x128 FP8 weight blocks read back in float32: what the FP8 layers (`modeling/fp8_numerics.py`) and the
CPU paths of the FP8 decode kernels (`moe_gemv.py`) both need, kept below both."""

import math

import torch

BLOCK = 128  # tile length (activations) and block side (weights)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `fp8_numerics.quantize_blocks` in float32, each element times the scale of its (possibly
    partial) block.

    The block size is 128, never derived from the scale grid: a [576, 7168] weight has a [5, 56] grid whose
    last row of blocks holds 64 rows, and a [136, 160] weight a [2, 2] grid of 128+8 by 128+32.
    """
    n, k = q.shape[-2:]
    expected = (math.ceil(n / BLOCK), math.ceil(k / BLOCK))
    if tuple(scale.shape[-2:]) != expected:
        raise ValueError(f"A [{n}, {k}] weight needs a {list(expected)} scale grid, got {list(scale.shape[-2:])}.")
    full = scale.float().repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return q.float() * full[..., :n, :k]


def dequantize_experts(gate_up, gate_up_scale, down, down_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 routed experts -> (gate_up [E, 2I, d], down [E, d, I]) in float32; the gate and up halves of gate_up have
    their own scale grids ([E, 2*ceil(I/128), ceil(d/128)]), as DeepSeek quantises them separately."""
    inter = down.shape[-1]
    g_inter = math.ceil(inter / BLOCK)
    gate = dequantize_blocks(gate_up[:, :inter], gate_up_scale[:, :g_inter])
    up = dequantize_blocks(gate_up[:, inter:], gate_up_scale[:, g_inter:])
    return torch.cat([gate, up], dim=1), dequantize_blocks(down, down_scale)
