"""The Triton kernel of the chunked loss (`modeling/output_loss.py`, imported only where Triton and CUDA exist, or
under Triton's interpreter): each row's cross-entropy term and its gradient written over the row's logits, reading
the row once for the logsumexp (an online max and sum of exponentials) and once more for the gradient. The
arithmetic is fp32 between loads and stores in the logits' dtype, as `_chunk_terms`."""

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

IGNORE_INDEX = -100
# elements of a row a program holds per step: 32 a thread (four 16-byte loads of bf16) in few, large programs, so
# that fewer rows (258 KB each in bf16 at a 129k vocabulary) are read at once. The fastest of
# `benchmarks/cross_entropy_kernel_bench.py`'s choices on an H100 (2026-12-07): 494 us a 2048 x 129,280 chunk against
# 543 for 16384 in 16 warps (547-598 on a persistent grid), 549 for 8192 in 8, and 772 for Inductor's kernel
BLOCK = 32768
WARPS = 32


@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, scale_ptr, loss_ptr, n_rows, n_cols, stride, IGNORE: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
    """Rows program_id, + num_programs, ...: loss_ptr[row] = (lse - x[target]) (0 for an ignored row); the row's
    logits x become (softmax(x) - onehot(target)) * scale (zeros for an ignored row)."""
    cols = tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row_ptr = logits_ptr + tl.cast(row, tl.int64) * stride  # rows x vocabulary may pass 2^31
        target = tl.load(targets_ptr + row)
        if target != IGNORE:
            # a target outside the row picks nothing, as the torch reference's one-hot does
            picked = tl.load(row_ptr + target, mask=(target >= 0) & (target < n_cols), other=0.0).to(tl.float32)
            m = float("-inf")
            s = 0.0
            for start in range(0, n_cols, BLOCK):
                x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
            lse = m + tl.log(s)
            for start in range(0, n_cols, BLOCK):
                offsets = start + cols
                mask = offsets < n_cols
                x = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                grad = (tl.exp(x - lse) - tl.where(offsets == target, 1.0, 0.0)) * scale
                tl.store(row_ptr + offsets, grad.to(logits_ptr.dtype.element_ty), mask=mask)
            tl.store(loss_ptr + row, lse - picked)
        else:  # nothing to read
            zeros = tl.zeros([BLOCK], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                tl.store(row_ptr + start + cols, zeros, mask=start + cols < n_cols)
            tl.store(loss_ptr + row, 0.0)


def cross_entropy_rows_in_place(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                                warps: int = WARPS, programs: int | None = None) -> torch.Tensor:  # fmt: skip
    """logits [c, V] (contiguous; bf16, fp16 or fp32), targets [c] (integers, -100 ignored), scale (0-d fp32) ->
    the sum over rows of -log softmax(logits)[target] (0-d fp32), the logits overwritten by the loss's gradient
    times scale: `output_loss._chunk_terms_over_logits` as one kernel and a sum of c values, with no read of the
    host. An ignored row is not read: its gradient is zeros even where its logits are not finite. `programs`: that
    many programs, each walking every programs-th row (a persistent grid: at most that many rows read at once, so
    that a row may still be in L2 for its second pass), rather than one a row."""
    rows, n_cols = logits.shape
    assert logits.is_contiguous() and scale.dtype == torch.float32 and scale.numel() == 1
    width = min(block, triton.next_power_of_2(n_cols))  # a short row: fewer warps, as many elements a thread
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grid = (rows if programs is None else max(1, min(programs, rows)),)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():  # CPU: the interpreter
        _cross_entropy_kernel[grid](
            logits, targets.contiguous(), scale, loss, rows, n_cols, n_cols, IGNORE=IGNORE_INDEX, BLOCK=width,
            num_warps=max(1, warps * width // block),
        )  # fmt: skip
    increment_version(logits)  # as an in-place torch op would
    return loss.sum()
