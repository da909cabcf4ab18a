"""The Triton kernel of `fbgemm_grouped.py` (imported only where Triton and CUDA exist): zero the weight gradients of
the experts that received no rows, which FBGEMM's grouped weight-gradient kernel leaves unwritten in an output it is
given (it zero-fills a whole output only where it allocates one itself)."""

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements a program writes per iteration
SPLIT = 16  # programs an expert: an idle expert's slice written by 16 programs, an active one's skipped at once


@triton.jit
def _zero_idle_kernel(out_ptr, rows_ptr, per_expert, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Programs (e, s): where expert e has no rows, zero every SPLIT-th BLOCK of its per_expert elements from s."""
    e = tl.program_id(0)
    if tl.load(rows_ptr + e) == 0:
        base = out_ptr + e.to(tl.int64) * per_expert  # E * per_expert may pass 2^31
        zeros = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
        for start in range(tl.program_id(1) * BLOCK, per_expert, SPLIT * BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            tl.store(base + offsets, zeros, mask=offsets < per_expert)


def zero_idle_experts(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out [E, N, K] (contiguous), rows [E]: out[e] = 0 where rows[e] == 0, in place; returns out."""
    _zero_idle_kernel[(out.shape[0], SPLIT)](out, rows, out[0].numel(), BLOCK=BLOCK, SPLIT=SPLIT)
    return out
