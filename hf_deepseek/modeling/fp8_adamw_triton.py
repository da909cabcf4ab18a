"""AdamW's update of an FP8 layer's weight that also writes the weight's FP8 copy (`fp8_weight_cache.py`): one Triton
kernel reads the weight, its gradient and both moments once, writes the new weight and moments as
`kernels/_adamw_triton.py` does (its `adamw_in_place`), and quantises the new weight's rows from the registers that
hold them, as `fp8_triton.quantize_rowwise_amax_triton` would from the stored weight, bit for bit:
the rows' FP8 values and scales, and for the routed experts' batched weights each column's amax (folded over a
program's rows, merged with one atomic max a column, as the "rows_amax" plan does). Rows of at most 4096 values
(whole rows in registers); wider weights take the plain update, and their copy is quantised afresh.

The blockwise recipe's copy (W's 128x128 blocks, their scales and W^T's FP8 values) is written by a program a block:
a block's amax is its own, so no program waits on another, and its FP8 values are stored twice, as W's block and
transposed as W^T's, as `fp8_triton._quant_blocks_kernel` writes them from the stored weight, bit for bit."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..kernels._adamw_triton import adamw_in_place
from ..kernels.moe_gemv import triton_available
from .fp8_numerics import _INTERPRET, _ceil_to, rowwise_amax_plan
from .fp8_triton import _abs_bits, _abs_nan_as_inf, _bits_to_float, _encode_e4m3, _row_scales, _scale_of, _to_e4m3

MAX_COLUMNS = 4096
FAST = not _INTERPRET  # the GPU's division and cast (see fp8_triton); the interpreter runs the reference arithmetic


@triton.jit
def _adamw_fp8_rows_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, s_ptr, amax_ptr, R, C, C_OUT, ROW_BLOCKS,
    lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
    POW2: tl.constexpr, FAST: tl.constexpr, AMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """ROWS rows of matrix pid // ROW_BLOCKS of p [(E,) R, C] (contiguous, as g, m, v), BLOCK_R at a time: the AdamW
    update, then the stored p's rows quantised into q [(E,) R, C_OUT] (zero past C) and s [(E,) R]; AMAX: each
    column's max |p| over the program's rows merged into amax [(E,) C_OUT] (int32 bits of float32, zeroed before)."""
    pid = tl.program_id(0)
    batch = tl.cast(pid // ROW_BLOCKS, tl.int64)
    first = (pid % ROW_BLOCKS) * ROWS
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    in_cols = (cols < C)[None, :]
    p_base = batch * R * C + cols[None, :]
    q_base = batch * R * C_OUT + cols[None, :]
    acc = _abs_bits(tl.zeros([BLOCK_R, BLOCK_C], dtype=p_ptr.dtype.element_ty))
    for i in range(0, ROWS, BLOCK_R):
        r = first + i + rows
        r64 = tl.cast(r, tl.int64)[:, None]
        inside = (r < R)[:, None] & in_cols
        offsets = p_base + r64 * C
        # the stored weight, which the copy is of (zero outside)
        p = adamw_in_place(p_ptr, g_ptr, m_ptr, v_ptr, offsets, inside, lr_decay, beta1, beta2, eps, step_size,
                           bias_correction2_sqrt)  # fmt: skip
        bits = _abs_bits(p)
        if AMAX:
            acc = tl.maximum(acc, bits)
        scale, inv = _row_scales(_bits_to_float(tl.max(bits, axis=1), p_ptr.dtype.element_ty), POW2)
        q = _encode_e4m3(p.to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
        tl.store(q_ptr + q_base + r64 * C_OUT, q, mask=(r < R)[:, None] & (cols < C_OUT)[None, :])
        tl.store(s_ptr + batch * R + r, scale, mask=r < R)
    if AMAX:
        amax = _bits_to_float(tl.max(acc, axis=0), p_ptr.dtype.element_ty)
        tl.atomic_max(amax_ptr + batch * C_OUT + cols, amax.to(tl.int32, bitcast=True), mask=cols < C_OUT)


@triton.jit
def _adamw_fp8_blocks_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, qt_ptr, s_ptr, N, K, NP, KP,
    lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, POW2: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Block (program_id(0), program_id(1)) of matrix program_id(2) of p [(E,) N, K] (contiguous, as g, m, v): the
    AdamW update, ROWS rows at a time (the four tensors of a whole block in float32 would spill registers), folding
    the stored block's amax; then the stored block read back (from L2) and its E4M3 values written into q [(E,) NP,
    KP] and, transposed, into qt [(E,) KP, NP], its scale into s [(E,) NP/128, KP/128] (zero past N and K: the
    padding's values are all zero)."""
    pid_n, pid_k, batch = tl.program_id(0), tl.program_id(1), tl.cast(tl.program_id(2), tl.int64)
    cols = pid_k * 128 + tl.arange(0, 128)
    in_cols = (cols < K)[None, :]
    acc = tl.zeros([ROWS, 128], dtype=tl.float32)
    for i in range(0, 128, ROWS):
        rows = pid_n * 128 + i + tl.arange(0, ROWS)
        inside = (rows < N)[:, None] & in_cols
        offsets = batch * N * K + tl.cast(rows, tl.int64)[:, None] * K + cols[None, :]
        # the stored weight, which the copy is of (zero outside)
        p = adamw_in_place(p_ptr, g_ptr, m_ptr, v_ptr, offsets, inside, lr_decay, beta1, beta2, eps, step_size,
                           bias_correction2_sqrt)  # fmt: skip
        acc = tl.maximum(acc, _abs_nan_as_inf(p.to(tl.float32)))
    scale = _scale_of(tl.max(tl.max(acc, axis=1), axis=0), POW2)
    tl.debug_barrier()  # the block's new values, read back below, were stored by every thread of the program
    q_base = batch * NP * KP
    for i in range(0, 128, ROWS):
        rows = pid_n * 128 + i + tl.arange(0, ROWS)
        inside = (rows < N)[:, None] & in_cols
        offsets = batch * N * K + tl.cast(rows, tl.int64)[:, None] * K + cols[None, :]
        w = tl.load(p_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        q = _to_e4m3(tl.clamp(tl.math.div_rn(w, scale), -448.0, 448.0))
        tl.store(q_ptr + q_base + tl.cast(rows, tl.int64)[:, None] * KP + cols[None, :], q)
        tl.store(qt_ptr + q_base + tl.cast(cols, tl.int64)[:, None] * NP + rows[None, :], tl.trans(q))
    tl.store(s_ptr + batch * (NP // 128) * (KP // 128) + pid_n * (KP // 128) + pid_k, scale)


def fusable(p, g, m, v, copy) -> bool:
    """Whether the fused update serves p and its copy: every tensor contiguous on one CUDA device (or Triton's
    interpreter on the CPU), rowwise rows of at most MAX_COLUMNS, and the copy laid out as the Hopper quantiser lays it
    out."""
    if not (triton_available() or _INTERPRET) or copy.q is None or p.dim() not in (2, 3):
        return False
    if not all(t.is_contiguous() and t.shape == p.shape and t.device == p.device for t in (g, m, v)):
        return False
    rows, cols = p.shape[-2:]
    if copy.q_t is not None:  # the blockwise copy: W's blocks, their scales, W^T's values
        lead, rows_out, cols_out = p.shape[:-2], _ceil_to(rows, 128), _ceil_to(cols, 128)
        layouts = ((copy.q, (rows_out, cols_out)), (copy.q_t, (cols_out, rows_out)),
                   (copy.scale, (rows_out // 128, cols_out // 128)))  # fmt: skip
        return p.is_contiguous() and all(
            t.device == p.device and t.shape == (*lead, *shape) and t.is_contiguous() for t, shape in layouts
        )
    lead, cols_out = p.shape[:-2], _ceil_to(cols, 16)
    amax_ok = copy.amax_t is None or (copy.amax_t.shape == (*lead, cols_out) and copy.amax_t.is_contiguous())
    return (
        p.is_contiguous()
        and cols_out <= MAX_COLUMNS
        and copy.q.device == p.device
        and copy.q.shape == (*lead, rows, cols_out)
        and copy.q.is_contiguous()
        and copy.scale.shape == (*lead, rows, 1)
        and copy.scale.is_contiguous()
        and amax_ok
    )


def adamw_update_fp8(
    p, g, m, v, lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, copy, *, rows_a_program=None
) -> None:
    """The update of p (as `kernels._adamw_triton.adamw_update`) writing `copy`'s q, scale and amax_t of the new p.
    `rows_a_program`: rows each program loops over where it folds column amaxes (default: the "rows_amax" plan's;
    `benchmarks/adamw_fp8_bench.py` times others). The blockwise copy (`copy.q_t`): W's blocks and W^T's values."""
    p3 = p if p.dim() == 3 else p[None]
    batch, rows, cols = p3.shape
    if copy.q_t is not None:
        grid = (triton.cdiv(rows, 128), triton.cdiv(cols, 128), batch)
        with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():  # CPU: Triton's interpreter
            _adamw_fp8_blocks_kernel[grid](
                p, g, m, v, copy.q, copy.q_t, copy.scale, rows, cols, grid[0] * 128, grid[1] * 128,
                lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, POW2=copy.pow2, ROWS=32, num_warps=8,
            )  # fmt: skip
        return
    cols_out = copy.q.shape[-1]
    amax = copy.amax_t is not None
    # whole rows, about 4096 values of each tensor a step (the plain update's block); the experts' batched weights loop
    # over the rows of the "rows_amax" plan, whose atomics then merge few programs a column
    block_c = triton.next_power_of_2(cols_out)
    block_r = max(1, MAX_COLUMNS // block_c)
    plan = rowwise_amax_plan(p3, rows, cols_out) if amax else None
    chunk = max(plan.chunk, block_r) if plan is not None else block_r
    if rows_a_program is not None and amax:
        chunk = max(block_r, rows_a_program // block_r * block_r)
    if amax:
        copy.amax_t.view(torch.int32).zero_()  # float32 bits; 0 is +0.0
    row_blocks = triton.cdiv(rows, chunk)
    amax_t = copy.amax_t.view(torch.int32) if amax else copy.scale  # (unused without AMAX)
    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():  # CPU: Triton's interpreter
        _adamw_fp8_rows_kernel[(batch * row_blocks,)](
            p, g, m, v, copy.q, copy.scale, amax_t, rows, cols, cols_out, row_blocks,
            lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
            POW2=copy.pow2, FAST=FAST, AMAX=amax, BLOCK_R=block_r, BLOCK_C=block_c, ROWS=chunk, num_warps=8,
        )  # fmt: skip
