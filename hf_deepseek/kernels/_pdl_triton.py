"""Programmatic dependent launch (PDL, SM90 and later) for the decode kernels (imported only where Triton and CUDA
exist). A kernel launched with PDL (`launch_pdl=True`, see `moe_gemv_config.pdl_arguments`) may start before the
kernel ahead of it in the stream (or CUDA graph) has finished, once all of that kernel's programs have allowed it;
it must then wait (`gdc_wait`) before it reads anything an earlier kernel writes, or writes anything. At batch 1 a
decode step is ~170 launches of 1-8 us each, so the launch gaps and each matrix-vector kernel's first DRAM round
trip are a large share of it: `pdl_start` lets the next kernel launch at once and, before waiting, asks L2 for this
program's first weight lines (weights, which no kernel of the step writes), so that the wait overlaps their reads.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line of every address in `ptrs` (no result; PTX `prefetch.global.L2`)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def pdl_start(w, w_row, n, n_ok, k_lo, k_hi, PDL: tl.constexpr, LINES: tl.constexpr, LINE: tl.constexpr):
    """With PDL: let the next kernel launch, prefetch the first LINES lines (LINE elements apart) of this program's
    weight rows `n` (`w_row` elements apart) from column `k_lo` into L2, then wait for the kernels before this one.
    Without: nothing. Call it before any load of an earlier kernel's output and before any store."""
    if PDL:
        gdc_launch_dependents()
        prefetch_rows(w, w_row, n, n_ok, k_lo, k_hi, LINES, LINE)
        gdc_wait()


@triton.jit
def prefetch_rows(w, w_row, n, n_ok, k_lo, k_hi, LINES: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for the first LINES lines (LINE elements apart, from column `k_lo`, within `k_hi`) of weight rows `n`
    (`w_row` elements apart; rows not `n_ok` read row 0). LINES 0: nothing."""
    if LINES > 0:
        cols = tl.minimum(k_lo + tl.arange(0, LINES) * LINE, k_hi - 1)
        rows = tl.where(n_ok, n, 0).to(tl.int64)
        _prefetch_l2(w + rows[:, None] * w_row + cols[None, :])


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """`pdl_start` without a prefetch: for kernels whose every input an earlier kernel writes."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


__all__ = ["pdl_start", "pdl_wait", "prefetch_rows"]
