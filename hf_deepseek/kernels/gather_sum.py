"""The sum over each token's rows of an expert-sorted buffer: out[t] = sum over its k choices of src[rows[t * k + j]],
each row weighted by the token's routing weight for the combine of the experts' outputs, unweighted for the tokens'
input gradient (the gradient of gathering each token's row once per chosen expert).

torch computes it as an index_select of the k rows (written out, [N*k, d]) and a sum over them; Inductor fuses the
two into one kernel, which took 0.47 ms a MoE layer in the FP8 training step's kernel table (H100, 2026-12-07; the
bench's 16,384 tokens, top-6, hidden 2048), where the bytes it must move (the rows read once, the sums written) take
about 0.16 ms at copy bandwidth. On CUDA with Triton it is one kernel that gathers whole rows
(`_gather_sum_triton.py`), each product rounded and the sum taken in float32 in the order of k, which is what torch
computes in bf16: the same values (the interpreter check and the GPU tests hold it to the reference exactly).
"""

from __future__ import annotations

import os

import torch

from .moe_gemv import triton_available

# False (or HF_DEEPSEEK_GATHER_SUM=0 in the environment): torch's index_select and sum everywhere (to measure them)
ENABLED = os.environ.get("HF_DEEPSEEK_GATHER_SUM", "1") != "0"


def gather_sum_reference(src: torch.Tensor, rows: torch.Tensor, top_k: int, weights: torch.Tensor | None = None):
    """out [N, d] = sum over j < top_k of src[rows[t * top_k + j]] (times weights[t, j] in src's dtype), as eager
    torch computes it in src's dtype."""
    gathered = src.index_select(0, rows).view(-1, top_k, src.shape[1])
    return (gathered if weights is None else gathered * weights[..., None].to(src.dtype)).sum(dim=1)


def gather_sum(src: torch.Tensor, rows: torch.Tensor, top_k: int, weights: torch.Tensor | None = None):
    """`gather_sum_reference`; on CUDA with Triton (and `ENABLED`) one kernel of the same values."""
    if ENABLED and src.is_cuda and triton_available():
        from ._gather_sum_triton import gather_sum_triton

        return gather_sum_triton(src, rows, top_k, weights)
    return gather_sum_reference(src, rows, top_k, weights)
