"""The Hopper backend of `fp8.py`: Triton quantisation kernels and FP8 GEMMs.

The quantisers reproduce `fp8_numerics.quantize_tiles` / `quantize_blocks` / `quantize_rowwise` bit for bit
(correctly rounded division, round-to-nearest-even E4M3). Inside `torch.compile` (with the recipe's
`fused_quantization`) the same quantisation is written as torch operations instead, which Inductor fuses into the
kernel that produced the tensor. Dense GEMMs go to cuBLAS through `torch._scaled_mm`'s blockwise recipes
(1x128 x 128x128 and 1x128 x 1x128) or its rowwise one; blockwise grouped expert GEMMs, and anything cuBLAS
refuses, run in a Triton kernel that promotes each 128-element partial sum to FP32 with both operands' scales, as
DeepSeek's kernels do; rowwise grouped GEMMs go to `torch._scaled_grouped_mm`. Which cuBLAS paths dispatch is
probed once, when the backend is built, outside any traced code.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..kernels import deep_gemm_grouped, fbgemm_grouped
from .fp8_numerics import (
    _INTERPRET,
    BLOCK,
    FP8,
    EmulatedBackend,
    ExpertLayout,
    FP8Recipe,
    RowwisePlan,
    _ceil_to,
    check_finite,
    quantize_blocks,
    quantize_rowwise,
    quantize_segment_columns,
    quantize_tiles,
    rowwise_amax_plan,
    rowwise_from_amax_plan,
    rowwise_plan,
    scales_from_amax,
)

logger = logging.getLogger(__name__)


@triton.jit
def _scale_of(amax, POW2: tl.constexpr):
    """max(amax, 1e-12) / 448, optionally rounded up to a power of two (exact bit arithmetic)."""
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        exponent = bits & 0x7F800000
        scale = tl.where((bits & 0x007FFFFF) != 0, exponent + 0x00800000, exponent).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _to_e4m3(v):
    """Round float32 values in [-448, 448] to the nearest E4M3 value (ties to even) while still in float32, so the
    final cast is exact whatever path the compiler takes (a direct cvt, or one through float16)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)  # keep 3 mantissa bits
    magnitude = (tl.abs(v) + 24576.0) - 24576.0  # below 2^-6 the step is 2^-9, the float32 spacing at 1.5 * 2^14
    sign = bits & -0x80000000  # copied bitwise: the sign of values that round to zero survives
    subnormal = (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal).to(tl.float8e4nv)


@triton.jit
def _abs_nan_as_inf(x):
    a = tl.abs(x)
    return tl.where(a == a, a, float("inf"))  # Triton's max drops NaN; inf survives it and fails the finite check


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, R, C, R_OUT,
    s_xr, s_xc, s_qr, s_sr, s_sc,
    POW2: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_R, 128] tile: per row amax, scale, E4M3 values. Rows R..R_OUT and columns C.. are zero."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * 128 + tl.arange(0, 128)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :] * s_xc, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(_abs_nan_as_inf(x), axis=1), POW2)
    q = _to_e4m3(tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0))
    out_rows = rows < R_OUT
    tl.store(q_ptr + rows[:, None] * s_qr + cols[None, :], q, mask=out_rows[:, None])
    tl.store(s_ptr + rows * s_sr + pid_c * s_sc, scale, mask=out_rows)


# --------------------------------------------------------------------------------------------------------------
# The rowwise quantiser: one scale per row of x [(E,) R, C] over C, the GEMM's reduction dimension, for any strides.
#
# Every load is coalesced along the dimension of x that is contiguous in memory, every store along q's rows:
#   "rows"        C contiguous (activations, output gradients, weights): a block of whole rows in registers, so x is
#                 read once; one launch.
#   "rows_loop"   C contiguous, rows too long for registers: each row block read twice (amax, then values); one launch.
#   "cols"        R contiguous (transposed views: the weights of the input gradient): tiles [BLOCK_C, BLOCK_R] read
#                 along R; a program owns a strip of BLOCK_R rows of q, reduces over all of C, reads the strip again
#                 and stores each tile transposed (in registers) along q's rows. A persistent grid bounds the bytes
#                 read between a strip's two passes, so that the second pass can hit L2; one launch.
#   "cols_split"  R contiguous with too few strips to fill the GPU, or strips too long for L2 (x^T and dy^T of the
#                 weight gradient: reductions along the tokens): C split into chunks; launch 1 writes each chunk's
#                 amax, launch 2 folds them and quantises its chunk, in reverse order (the chunks read last, still in
#                 L2, first). Two launches, no memset, no atomics.
#   "rows_amax"   "rows", looping over many rows a program, which also folds the amax of each column of x (of each row
#                 of x^T) and merges it into a zeroed [(E,) C] buffer with atomic max (`quantize_rowwise_amax_triton`):
#                 one read of x for its rows' quantisation and its transpose's amaxes.
#   "cols_amax"   the second launch of "cols_split" alone, for a transposed view whose rows' amaxes "rows_amax" took
#                 already (`quantize_rowwise_triton(..., amax=)`): one read of x, no amax pass. The experts' weights,
#                 needed in both orientations, are so read twice instead of twice plus an L2 pass (`cols`). For a
#                 single matrix the atomics of hundreds of programs a column make "rows_amax" slower than "rows" plus
#                 the transpose's own amax pass (`fp8_numerics.rowwise_amax_plan`), so activations, output gradients
#                 and the dense weights keep the passes apart.
# Plans (`fp8_numerics.rowwise_plan` and neighbours) are plain Python, importable without Triton.
# Values: x / scale rounded to float32 as `div_rn` would, then to E4M3 (ties to even). On the GPU (FAST) the division
# is a multiplication by the row's correctly rounded reciprocal plus one fma correction, exact wherever the quotient
# is at least 2^-11 (below, E4M3 is a signed zero either way, and the sign is copied from x), and the cast is the
# hardware's round-to-nearest-even `cvt.rn.satfinite.e4m3x2.f32`. Triton's interpreter, whose fma rounds twice and
# whose float8 cast does not round to nearest even, runs the reference arithmetic (`div_rn`, `_to_e4m3`) by default;
# `benchmarks/triton_interpreter_check.py` checks both, the FAST one with the GPU's fma and cast emulated.
# Amaxes fold |x| as integers of x's width (`_abs_bits`): exact, and two bf16 values an instruction.


@triton.jit
def _max_nan(a, b):
    """max that keeps NaN (Triton's default drops it), so that a NaN anywhere in a row reaches its amax."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_scales(amax, POW2: tl.constexpr):
    """Scales of rows with this amax (NaN counts as inf: an inf scale, caught by the finite check) and their
    correctly rounded reciprocals."""
    scale = _scale_of(tl.where(amax == amax, amax, float("inf")), POW2)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _encode_e4m3(x, scale, inv, POW2: tl.constexpr, FAST: tl.constexpr):
    """E4M3 of clamp(div_rn(x, scale), -448, 448), bit for bit. FAST: q0 = |x| * inv, then one Markstein step
    q = fma(fma(q0, -scale, |x|), inv, q0) (exact for pow2 scales without it), the sign of x copied in, and the
    hardware's RNE cast; three FP32 instructions instead of a division's ten (and a branch) per element."""
    if FAST:
        a = tl.abs(x)
        q = a * inv
        if not POW2:
            q = tl.fma(tl.fma(q, -scale, a), inv, q)  # -scale: one negation a row, not one a value
        q = tl.minimum(q, 448.0)
        sign = x.to(tl.int32, bitcast=True) & -0x80000000
        return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True).to(tl.float8e4nv)
    else:
        return _to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))


@triton.jit
def _rowwise_rows_kernel(
    x_ptr, q_ptr, s_ptr, R, C, R_OUT, C_OUT, s_xb, s_xr, s_qb, s_qr, s_sb, ROW_BLOCKS,
    POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOOP: tl.constexpr,
):  # fmt: skip
    """x [(E,) R, C] with C contiguous: BLOCK_R rows of matrix pid // ROW_BLOCKS. Not LOOP: the whole rows
    (C_OUT <= BLOCK_C) in registers; LOOP: an amax pass over the columns, then a quantising pass. Rows R..R_OUT
    and columns C..C_OUT of q are zero."""
    pid = tl.program_id(0)
    batch = tl.cast(pid // ROW_BLOCKS, tl.int64)
    r0 = (pid % ROW_BLOCKS) * BLOCK_R
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    x_rows = x_ptr + batch * s_xb + tl.cast(r0, tl.int64) * s_xr + rows[:, None] * s_xr
    q_rows = q_ptr + batch * s_qb + tl.cast(r0, tl.int64) * s_qr + rows[:, None] * s_qr
    in_rows = (r0 + rows < R)[:, None]
    out_rows = (r0 + rows < R_OUT)[:, None]
    if LOOP:
        acc = _abs_bits(tl.zeros([BLOCK_R, BLOCK_C], dtype=x_ptr.dtype.element_ty))
        for c in range(0, C, BLOCK_C):
            x = tl.load(x_rows + (c + cols)[None, :], mask=in_rows & (c + cols < C)[None, :], other=0.0)
            acc = tl.maximum(acc, _abs_bits(x))
        scale, inv = _row_scales(_bits_to_float(tl.max(acc, axis=1), x_ptr.dtype.element_ty), POW2)
        for c in range(0, C_OUT, BLOCK_C):
            x = tl.load(x_rows + (c + cols)[None, :], mask=in_rows & (c + cols < C)[None, :], other=0.0)
            q = _encode_e4m3(x.to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
            tl.store(q_rows + (c + cols)[None, :], q, mask=out_rows & (c + cols < C_OUT)[None, :])
    else:
        x = tl.load(x_rows + cols[None, :], mask=in_rows & (cols < C)[None, :], other=0.0)
        scale, inv = _row_scales(_bits_to_float(tl.max(_abs_bits(x), axis=1), x_ptr.dtype.element_ty), POW2)
        q = _encode_e4m3(x.to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
        tl.store(q_rows + cols[None, :], q, mask=out_rows & (cols < C_OUT)[None, :])
    tl.store(s_ptr + batch * s_sb + r0 + rows, scale, mask=r0 + rows < R_OUT)


@triton.jit
def _rowwise_rows_amax_kernel(
    x_ptr, q_ptr, s_ptr, amax_ptr, R, C, R_OUT, C_OUT, s_xb, s_xr, s_qb, s_qr, s_sb, s_ab, ROW_BLOCKS,
    POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """x [(E,) R, C] with C contiguous, whole rows (C_OUT <= BLOCK_C): ROWS rows of matrix pid // ROW_BLOCKS,
    BLOCK_R at a time, quantised as `_rowwise_rows_kernel` does (rows R..R_OUT and columns C..C_OUT of q zero),
    while |x| of each column is folded over them (as integers of x's width, `_abs_bits`) and merged into amax
    [(E,) C_OUT] (int32 bits of float32, zeroed before) by one atomic max a column: for non-negative floats the
    integer order is the float order, NaN above inf, so the result is exact and the same in any order."""
    pid = tl.program_id(0)
    batch = tl.cast(pid // ROW_BLOCKS, tl.int64)
    first = (pid % ROW_BLOCKS) * ROWS
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    x_base = x_ptr + batch * s_xb + cols[None, :]
    q_base = q_ptr + batch * s_qb + cols[None, :]
    in_cols = (cols < C)[None, :]
    out_cols = (cols < C_OUT)[None, :]
    acc = _abs_bits(tl.zeros([BLOCK_R, BLOCK_C], dtype=x_ptr.dtype.element_ty))
    for i in range(0, ROWS, BLOCK_R):
        r = first + i + rows
        r64 = tl.cast(r, tl.int64)[:, None]
        x = tl.load(x_base + r64 * s_xr, mask=(r < R)[:, None] & in_cols, other=0.0)
        bits = _abs_bits(x)
        acc = tl.maximum(acc, bits)
        scale, inv = _row_scales(_bits_to_float(tl.max(bits, axis=1), x_ptr.dtype.element_ty), POW2)
        q = _encode_e4m3(x.to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
        tl.store(q_base + r64 * s_qr, q, mask=(r < R_OUT)[:, None] & out_cols)
        tl.store(s_ptr + batch * s_sb + r, scale, mask=r < R_OUT)
    amax = _bits_to_float(tl.max(acc, axis=0), x_ptr.dtype.element_ty)
    tl.atomic_max(amax_ptr + batch * s_ab + cols, amax.to(tl.int32, bitcast=True), mask=cols < C_OUT)


@triton.jit
def _abs_bits(x):
    """|x| as an integer of x's width: for non-negative floats the integer order is the float order, and NaN comes
    above inf, so an integer max over these keeps NaN (read back as NaN, hence an inf scale); exact, any width."""
    if x.dtype.primitive_bitwidth == 16:
        return x.to(tl.int16, bitcast=True) & 0x7FFF
    else:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _bits_to_float(bits, dtype: tl.constexpr):
    """The float32 value of `_abs_bits` (widened by a reduction) read back as dtype."""
    if dtype.primitive_bitwidth == 16:
        return bits.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    else:
        return bits.to(tl.int32).to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _cols_amax(x_base, r_in, rr, cc, c_lo, c_hi, s_xc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """max |x| over columns [c_lo, c_hi) of a strip: tiles [BLOCK_C, BLOCK_R] read along the (contiguous) rows,
    the next tile's load issued before this one is folded in (two tiles in flight), folded as integers of x's
    width (no conversion to float32 a value), reduced over the columns once at the end."""
    tile = cc[:, None] * s_xc + rr[None, :]
    x_next = tl.load(x_base + tl.cast(c_lo, tl.int64) * s_xc + tile, mask=r_in & (c_lo + cc < c_hi)[:, None], other=0.0)
    acc = _abs_bits(tl.zeros([BLOCK_C, BLOCK_R], dtype=x_base.dtype.element_ty))
    for c in range(c_lo, c_hi, BLOCK_C):
        x = x_next
        c_next = c + BLOCK_C
        x_next = tl.load(
            x_base + tl.cast(c_next, tl.int64) * s_xc + tile, mask=r_in & (c_next + cc < c_hi)[:, None], other=0.0
        )
        acc = tl.maximum(acc, _abs_bits(x))
    return _bits_to_float(tl.max(acc, axis=0), x_base.dtype.element_ty)


@triton.jit
def _cols_quantise(
    x_base, q_base, r_in, r_out, rr, cc, c_lo, c_hi, C, s_xc, s_qr, scale, inv,
    POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """E4M3 of columns [c_lo, c_hi) of a strip (zero from column C on), each tile transposed in registers and
    stored along q's rows, q's contiguous dimension."""
    tile = cc[:, None] * s_xc + rr[None, :]
    for c in range(c_lo, c_hi, BLOCK_C):
        x = tl.load(x_base + tl.cast(c, tl.int64) * s_xc + tile, mask=r_in & (c + cc < C)[:, None], other=0.0)
        q = _encode_e4m3(tl.trans(x).to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)  # [BLOCK_R, BLOCK_C]
        tl.store(q_base + c + rr[:, None] * s_qr + cc[None, :], q, mask=tl.trans(r_out) & (c + cc < c_hi)[None, :])


@triton.jit
def _rowwise_cols_kernel(
    x_ptr, q_ptr, s_ptr, part_ptr, R, C, R_OUT, C_OUT, s_xb, s_xc, s_qb, s_qr, s_sb, ROW_BLOCKS, CHUNKS, CHUNK, ITEMS,
    PARTS, POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PHASE: tl.constexpr,
):  # fmt: skip
    """x [(E,) R, C] with R contiguous (a transposed view). Items: (matrix, chunk of C, block of BLOCK_R rows), the
    row block fastest. PHASE 0 ("cols"): each program takes items pid, pid + programs, ... (one chunk: all of C):
    amax pass, then quantising pass. PHASE 1: the amax of item pid's chunk into part [E, PARTS = CHUNKS, R_OUT].
    PHASE 2: item ITEMS - 1 - pid folds its rows' PARTS partial amaxes and quantises its chunk (chunk 0 writes the
    scales); "cols_amax" runs it alone, on the amaxes of "rows_amax" (PARTS = 1)."""
    pid = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    if PHASE == 0:
        for item in range(pid, ITEMS, tl.num_programs(0)):
            batch = tl.cast(item // ROW_BLOCKS, tl.int64)
            r0 = (item % ROW_BLOCKS) * BLOCK_R
            x_base = x_ptr + batch * s_xb + r0
            r_in = (r0 + rr < R)[None, :]
            r_out = (r0 + rr < R_OUT)[None, :]
            scale, inv = _row_scales(_cols_amax(x_base, r_in, rr, cc, 0, C, s_xc, BLOCK_R, BLOCK_C), POW2)
            # written out and read back (visible to the whole program after the barrier): the scales then reach the
            # quantising loop in a layout of their own, and Triton transposes the bf16 tiles there with ldmatrix
            # (LDSM.16.MT88) instead of the E4M3 ones a byte at a time (one LDS.U8 a value); seen in the SASS
            tl.store(s_ptr + batch * s_sb + r0 + rr, scale, mask=r0 + rr < R_OUT)
            tl.debug_barrier()
            scale = tl.load(s_ptr + batch * s_sb + r0 + rr, mask=r0 + rr < R_OUT, other=1.0)
            inv = tl.math.div_rn(1.0, scale)
            q_base = q_ptr + batch * s_qb + tl.cast(r0, tl.int64) * s_qr
            _cols_quantise(
                x_base, q_base, r_in, r_out, rr, cc, 0, C_OUT, C, s_xc, s_qr, scale, inv, POW2, FAST, BLOCK_C
            )
    else:
        item = pid if PHASE == 1 else ITEMS - 1 - pid
        r0 = (item % ROW_BLOCKS) * BLOCK_R
        chunk = (item // ROW_BLOCKS) % CHUNKS
        batch = tl.cast(item // (ROW_BLOCKS * CHUNKS), tl.int64)
        c_lo = chunk * CHUNK
        x_base = x_ptr + batch * s_xb + r0
        r_in = (r0 + rr < R)[None, :]
        r_out = (r0 + rr < R_OUT)[None, :]
        part = part_ptr + batch * PARTS * R_OUT + r0 + rr
        if PHASE == 1:
            amax = _cols_amax(x_base, r_in, rr, cc, c_lo, tl.minimum(c_lo + CHUNK, C), s_xc, BLOCK_R, BLOCK_C)
            tl.store(part + chunk * R_OUT, amax, mask=r0 + rr < R_OUT)
        else:
            amax = tl.zeros([BLOCK_R], dtype=tl.float32)
            for k in range(0, PARTS):
                amax = _max_nan(amax, tl.load(part + k * R_OUT, mask=r0 + rr < R_OUT, other=0.0))
            scale, inv = _row_scales(amax, POW2)
            q_base = q_ptr + batch * s_qb + tl.cast(r0, tl.int64) * s_qr
            c_hi = tl.minimum(c_lo + CHUNK, C_OUT)
            _cols_quantise(
                x_base, q_base, r_in, r_out, rr, cc, c_lo, c_hi, C, s_xc, s_qr, scale, inv, POW2, FAST, BLOCK_C
            )
            if chunk == 0:
                tl.store(s_ptr + batch * s_sb + r0 + rr, scale, mask=r0 + rr < R_OUT)


def quantize_rowwise_triton(
    x: torch.Tensor,
    rows_out: int,
    cols_out: int,
    pow2: bool,
    *,
    plan: RowwisePlan | None = None,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_numerics.quantize_rowwise` of x [(E,) R, C] (any strides) zero-padded to [(E,) rows_out, cols_out],
    bit for bit: q row-major [(E,) rows_out, cols_out], scales [(E,) rows_out, 1]. One launch, or two for a
    transposed view with long reductions (see the comment above `_max_nan`); `plan` overrides `rowwise_plan`.
    `amax` [(E,) >= R] fp32, each row's max |x| taken already (by `quantize_rowwise_amax_triton` of the tensor x is
    a transposed view of; zero past R): a transposed view is then quantised in one launch without an amax pass
    ("cols_amax"); row-contiguous operands, read once either way, ignore it."""
    x3 = x if x.dim() == 3 else x[None]
    batch, rows, cols = x3.shape
    if not (x3.stride(2) == 1 or cols == 1 or x3.stride(1) == 1 or rows == 1):
        x3 = x3.contiguous()  # neither dimension contiguous: no coalesced way to read it
    q = torch.empty(batch, rows_out, cols_out, dtype=FP8, device=x.device)
    scale = torch.empty(batch, rows_out, 1, dtype=torch.float32, device=x.device)
    if plan is None:
        transposed = not (x3.stride(2) == 1 or cols == 1)
        plan = (rowwise_from_amax_plan if amax is not None and transposed else rowwise_plan)(x3, rows_out, cols_out)
    if q.numel() == 0:
        return (q, scale) if x.dim() == 3 else (q[0], scale[0])
    sizes = (rows, cols, rows_out, cols_out)
    out_strides = (q.stride(0), q.stride(1), scale.stride(0))
    row_blocks = triton.cdiv(rows_out, plan.block_r)
    common = dict(POW2=pow2, FAST=plan.fast, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=plan.num_warps)
    if plan.kind in ("rows", "rows_loop"):
        if not (x3.stride(2) == 1 or cols == 1):
            x3 = x3.contiguous()
        _rowwise_rows_kernel[(batch * row_blocks,)](
            x3, q, scale, *sizes, x3.stride(0), x3.stride(1), *out_strides, row_blocks, LOOP=plan.kind == "rows_loop",
            **common,
        )  # fmt: skip
    else:
        if not (x3.stride(1) == 1 or rows == 1):
            x3 = x3.transpose(1, 2).contiguous().transpose(1, 2)
        x_strides = (x3.stride(0), x3.stride(2))
        if plan.kind == "cols":
            items = batch * row_blocks
            grid = (min(items, plan.programs) if plan.programs else items,)
            _rowwise_cols_kernel[grid](
                x3, q, scale, scale, *sizes, *x_strides, *out_strides, row_blocks, 1, cols_out, items, 1, PHASE=0,
                **common,
            )  # fmt: skip
        elif plan.kind == "cols_amax":
            if amax is None:
                raise ValueError("a cols_amax plan quantises from given amaxes: pass amax")
            part = amax.reshape(batch, -1)[:, :rows_out]  # [E, rows_out]: PARTS = 1 partial amax a row
            part = F.pad(part, (0, rows_out - part.shape[1])).contiguous()  # amaxes of padding rows: zero
            chunks = triton.cdiv(cols_out, plan.chunk)
            items = batch * chunks * row_blocks
            _rowwise_cols_kernel[(items,)](
                x3, q, scale, part, *sizes, *x_strides, *out_strides, row_blocks, chunks, plan.chunk, items, 1,
                PHASE=2, **common,
            )  # fmt: skip
        else:
            chunks = triton.cdiv(cols_out, plan.chunk)
            items = batch * chunks * row_blocks
            part = torch.empty(batch, chunks, rows_out, dtype=torch.float32, device=x.device)
            for phase in (1, 2):
                _rowwise_cols_kernel[(items,)](
                    x3, q, scale, part, *sizes, *x_strides, *out_strides, row_blocks, chunks, plan.chunk, items,
                    chunks, PHASE=phase, **common,
                )  # fmt: skip
    return (q, scale) if x.dim() == 3 else (q[0], scale[0])


def quantize_rowwise_amax_triton(
    x: torch.Tensor, rows_out: int, cols_out: int, pow2: bool, *, plan: RowwisePlan | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`quantize_rowwise_triton(x, rows_out, cols_out, pow2)` of x [(E,) R, C] and, from the same read, the amax of
    each column of x: (q, scale, amax [(E,) cols_out] fp32, zero past C), what `quantize_rowwise_triton` of x^T takes
    as `amax` ("rows_amax", one launch after zeroing the amaxes). amax is None where `rowwise_amax_plan` gives no
    plan (a single matrix, or rows too wide for registers): x^T then takes its own amax pass."""
    x3 = x if x.dim() == 3 else x[None]
    batch, rows, cols = x3.shape
    plan = plan if plan is not None else rowwise_amax_plan(x3, rows_out, cols_out)
    if plan is None:
        return (*quantize_rowwise_triton(x, rows_out, cols_out, pow2), None)
    if not (x3.stride(2) == 1 or cols == 1):
        x3 = x3.contiguous()
    q = torch.empty(batch, rows_out, cols_out, dtype=FP8, device=x.device)
    scale = torch.empty(batch, rows_out, 1, dtype=torch.float32, device=x.device)
    amax = torch.zeros(batch, cols_out, dtype=torch.int32, device=x.device)  # float32 bits; 0 is +0.0
    if q.numel():
        row_blocks = triton.cdiv(rows_out, plan.chunk)
        _rowwise_rows_amax_kernel[(batch * row_blocks,)](
            x3, q, scale, amax, rows, cols, rows_out, cols_out, x3.stride(0), x3.stride(1), q.stride(0), q.stride(1),
            scale.stride(0), amax.stride(0), row_blocks, POW2=pow2, FAST=plan.fast, BLOCK_R=plan.block_r,
            BLOCK_C=plan.block_c, ROWS=plan.chunk, num_warps=plan.num_warps,
        )  # fmt: skip
    amax = amax.view(torch.float32)
    return (q, scale, amax) if x.dim() == 3 else (q[0], scale[0], amax[0])


# The rowwise recipe's operands of the experts' FP8 weight gradient (`fp8_numerics.quantize_segment_columns`, bit
# for bit), in two kernels over the layout's 128-row blocks (each block belongs to one expert): each block's column
# amaxes merged into its expert's [E, C] by one atomic max a column (int32 bits, as `_rowwise_rows_amax_kernel`);
# then each block divided by its expert's column scales and stored transposed, q^T [C, R] row-major, the K-contiguous
# operand torch's `_scaled_grouped_mm` takes for a weight gradient dy^T x (its reduction runs over the tokens).
# Blocks of no expert are written as zeros and read by no amax. The scales between the two are `scales_from_amax` of
# the merged amaxes (E x C values, in torch), which `_row_scales` reproduces in the second kernel. With a row index
# (GATHER: the layout's `token_pad`) both read each laid-out row from the token rows themselves: no laid-out copy.

SEGMENT_COLUMNS = 64  # columns a program of the segment-column quantiser: a [128, 64] bf16 tile, 16 KiB


@triton.jit
def _segment_rows(
    x_ptr, index_ptr, block, R, C, s_xr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GATHER: tl.constexpr
):  # fmt: skip
    """The tile of block `block` (BLOCK_R laid-out rows), columns program_id(1) * BLOCK_C on: x's rows themselves,
    or (GATHER) x's rows index[r], index R being a zero row. Returns (tile, its column offsets)."""
    rows = tl.cast(block, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (cols < C)[None, :]
    if GATHER:
        src = tl.load(index_ptr + rows).to(tl.int64)
        mask = mask & (src < R)[:, None]
    else:
        src = rows
    return tl.load(x_ptr + src[:, None] * s_xr + cols[None, :], mask=mask, other=0.0), cols


@triton.jit
def _segment_columns_amax_kernel(
    x_ptr, index_ptr, block_expert_ptr, amax_ptr, R, C, s_xr, s_ae,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """The tile's max |x| a column folded into its block's expert's row of amax [E, C] (int32 bits, zeroed before)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= 0:
        x, cols = _segment_rows(x_ptr, index_ptr, block, R, C, s_xr, BLOCK_R, BLOCK_C, GATHER)
        amax = _bits_to_float(tl.max(_abs_bits(x), axis=0), x_ptr.dtype.element_ty)
        tl.atomic_max(amax_ptr + expert * s_ae + cols, amax.to(tl.int32, bitcast=True), mask=cols < C)


@triton.jit
def _segment_columns_quant_kernel(
    x_ptr, index_ptr, block_expert_ptr, amax_ptr, q_ptr, R, C, s_xr, s_ae, s_qc,
    POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """The same tile divided by its expert's column scales, E4M3, stored transposed into q^T [C, 128 x blocks] (zeros
    for a block of no expert)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    rows = tl.cast(block, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    out = q_ptr + tl.cast(cols, tl.int64)[:, None] * s_qc + rows[None, :]
    if expert >= 0:
        x, _ = _segment_rows(x_ptr, index_ptr, block, R, C, s_xr, BLOCK_R, BLOCK_C, GATHER)
        amax = tl.load(amax_ptr + expert * s_ae + cols, mask=cols < C, other=0).to(tl.float32, bitcast=True)
        scale, inv = _row_scales(amax, POW2)
        # transposed while still bf16 (Triton moves 16-bit tiles with ldmatrix), then encoded along q^T's rows
        q = _encode_e4m3(tl.trans(x).to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
        tl.store(out, q, mask=(cols < C)[:, None])
    else:
        tl.store(out, tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32).to(tl.float8e4nv), mask=(cols < C)[:, None])


def quantize_segment_columns_triton(
    t: torch.Tensor,
    block_expert: torch.Tensor,
    num_experts: int,
    pow2: bool,
    fast: bool,
    row_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_numerics.quantize_segment_columns(t, block_expert, num_experts, pow2, row_index=row_index)` of t [R, C]
    (C contiguous; R = 128 x len(block_expert) at least, or any with `row_index` [128 x len(block_expert)] of t's rows,
    R meaning a zero row): (q^T [C, 128 x len(block_expert)] E4M3, scale [E, C] fp32). `fast`: the GPU's division
    (`_encode_e4m3`); the interpreter takes the reference arithmetic."""
    blocks, cols = block_expert.shape[0], t.shape[1]
    laid_out = row_index.shape[0] if row_index is not None else t.shape[0]
    if laid_out < blocks * BLOCK:
        raise ValueError(f"an expert layout of {blocks} blocks of {BLOCK} rows needs that many rows, got {laid_out}")
    if t.stride(1) != 1:
        t = t.contiguous()
    amax = torch.zeros(num_experts, cols, dtype=torch.int32, device=t.device)  # float32 bits; 0 is +0.0
    q_t = torch.empty(cols, blocks * BLOCK, dtype=FP8, device=t.device)
    grid = (blocks, triton.cdiv(cols, SEGMENT_COLUMNS))
    if q_t.numel():
        index = row_index if row_index is not None else block_expert  # (not read without GATHER)
        tiles = dict(BLOCK_R=BLOCK, BLOCK_C=SEGMENT_COLUMNS, GATHER=row_index is not None, num_warps=4)
        sizes = (t.shape[0], cols, t.stride(0), amax.stride(0))
        _segment_columns_amax_kernel[grid](t, index, block_expert, amax, *sizes, **tiles)
        _segment_columns_quant_kernel[grid](
            t, index, block_expert, amax, q_t, *sizes, q_t.stride(0), POW2=pow2, FAST=fast, **tiles
        )
    return q_t, scales_from_amax(amax.view(torch.float32), pow2)


@triton.jit
def _quant_blocks_kernel(
    w_ptr, q_ptr, s_ptr, N, K, s_we, s_wn, s_wk, s_qe, s_qn, s_se, s_sn, s_sk,
    POW2: tl.constexpr,
):  # fmt: skip
    """One 128x128 block of expert `program_id(2)`: one scale, E4M3 values into the zero-padded q [Np, Kp].
    Run on a transposed view of w it writes q^T: a block's amax, hence its scale and values, are the same."""
    pid_n, pid_k, expert = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    w_ptrs = w_ptr + expert * s_we + rows[:, None] * s_wn + cols[None, :] * s_wk
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.max(_abs_nan_as_inf(w), axis=1), axis=0), POW2)
    q = _to_e4m3(tl.clamp(tl.math.div_rn(w, scale), -448.0, 448.0))
    tl.store(q_ptr + expert * s_qe + rows[:, None] * s_qn + cols[None, :], q)
    tl.store(s_ptr + expert * s_se + pid_n * s_sn + pid_k * s_sk, scale)


@triton.jit
def _gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, block_expert_ptr, M, N, K,
    s_am, s_asm, s_ask, s_be, s_bn, s_bse, s_bsn, s_bsk, s_cm,
    B_BLOCKS: tl.constexpr, GROUPED: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """c[m, n] = sum over 128-wide K tiles of (a_tile . b_tile) * a_scale[m, t] * b_scale[n, t], in fp32.

    a [M, K] and b [(E,) N, K] are K-contiguous E4M3. b's scale is per 128x128 block (B_BLOCKS) or per row.
    GROUPED: the 128-row block of a at row m belongs to expert block_expert[m // 128] (-1: write zeros).
    """
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # L2-friendly order: GROUP_M row blocks sweep all column blocks together
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_tiles = tl.cdiv(K, 128)
    expert = 0
    if GROUPED:
        expert = tl.load(block_expert_ptr + pid_m * BLOCK_M // 128)
        k_tiles = tl.where(expert >= 0, k_tiles, 0)
        expert = tl.maximum(expert, 0)
    a_ptrs = a_ptr + offs_m[:, None] * s_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * s_be + offs_n[:, None] * s_bn + offs_k[None, :]
    as_ptrs = as_ptr + offs_m * s_asm
    b_rows = offs_n // 128 if B_BLOCKS else offs_n  # one scale per 128 rows of b, or one per row
    bs_ptrs = bs_ptr + expert * s_bse + b_rows * s_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, k_tiles):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < K - t * 128
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a_scale = tl.load(as_ptrs + t * s_ask, mask=m_mask, other=0.0)
        b_scale = tl.load(bs_ptrs + t * s_bsk, mask=n_mask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_scale[:, None] * b_scale[None, :]  # FP32 promotion every 128 of K
        a_ptrs += 128
        b_ptrs += 128
    c_ptrs = c_ptr + offs_m[:, None] * s_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _wgrad_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, seg_start_ptr, seg_end_ptr, N, K,
    s_an, s_asn, s_ast, s_bk, s_bsk, s_bst, s_ce, s_cn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Per expert e: c[e] = a[:, rows of e] @ b[:, rows of e]^T; a [N, T] and b [K, T] tiled 1x128 along T."""
    pid_n, pid_k, expert = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(seg_start_ptr + expert)
    end = tl.load(seg_end_ptr + expert)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, 128)
    n_mask, k_mask = offs_n < N, offs_k < K
    a_ptrs = a_ptr + offs_n[:, None] * s_an + (start + offs_t)[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + (start + offs_t)[None, :]
    as_ptrs = as_ptr + offs_n * s_asn + (start // 128) * s_ast
    bs_ptrs = bs_ptr + offs_k * s_bsk + (start // 128) * s_bst
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(start, end, 128):
        a = tl.load(a_ptrs, mask=n_mask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        a_scale = tl.load(as_ptrs, mask=n_mask, other=0.0)
        b_scale = tl.load(bs_ptrs, mask=k_mask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_scale[:, None] * b_scale[None, :]
        a_ptrs += 128
        b_ptrs += 128
        as_ptrs += s_ast
        bs_ptrs += s_bst
    c_ptrs = c_ptr + expert * s_ce + offs_n[:, None] * s_cn + offs_k[None, :]
    tl.store(c_ptrs, acc, mask=n_mask[:, None] & k_mask[None, :])


def _col_major(scale: torch.Tensor) -> torch.Tensor:
    """[R, T] scales with the row index contiguous (stride (1, R)), the layout cuBLAS reads 1x128 scales in."""
    return scale if scale.stride() == (1, scale.shape[0]) else scale.t().contiguous().t()


def _pad_k_blocks(a, a_scale, b, b_scale):
    """The operands of a blockwise product with zero columns (scale 1) that bring K to a multiple of 4 blocks:
    cuBLAS reads 128x128 scales with a leading dimension padded to 4 K-blocks (without, products such as the input
    gradient of q_a/kv_a joined, K of 17 blocks, or the shared experts' down, 22, went to the Triton kernel: 15.6 ms
    in 33 launches of the bench's blockwise step), and a zero tile adds nothing to the sum."""
    extra = -(a.shape[1] // BLOCK) % 4

    def pad(q):
        return F.pad(q.view(torch.uint8), (0, extra * BLOCK)).view(FP8)

    return pad(a), F.pad(a_scale, (0, extra), value=1.0), pad(b), F.pad(b_scale, (0, extra), value=1.0)


class HopperBackend:
    """FP8 on compute capability 9.0+: Triton (or Inductor-fused) quantisers, cuBLAS GEMMs where they dispatch,
    Triton GEMMs for the blockwise grouped experts and the rest. The same conventions as
    `fp8_numerics.EmulatedBackend`."""

    name = "hopper"
    device_type = "cuda"
    GEMM_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=4)
    WGRAD_CONFIG = dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4)

    def __init__(self, recipe: FP8Recipe, device: torch.device | None = None):
        self.recipe, self.rowwise = recipe, recipe.rowwise
        self.pow2, self.check = recipe.pow2_scales, bool(recipe.check_finite)  # None: no device sync
        # (b_blocks, out dtype) -> does torch._scaled_mm dispatch it and agree with the emulation; probed now,
        # never inside traced code
        self.cublas = {(b, d): False for b in (True, False) for d in (torch.bfloat16, torch.float32)}
        if recipe.gemm != "triton" and not self.rowwise:
            device = torch.device(device if device is not None else "cuda")
            self.cublas = {key: self._probe_cublas(*key, device) for key in self.cublas}
        # FBGEMM's grouped kernels where the recipe asks and the wheel imports (found now, not in traced code): for
        # the FP8 products, and for the bf16 weight gradient
        wgrad_gemm = recipe.grouped_gemm if recipe.grouped_wgrad_gemm == "auto" else recipe.grouped_wgrad_gemm
        self.fbgemm = recipe.grouped_gemm == "fbgemm" and fbgemm_grouped.available()
        self.fbgemm_wgrad = wgrad_gemm == "fbgemm" and fbgemm_grouped.available()
        self.deep_gemm = recipe.grouped_gemm == "deep_gemm" and deep_gemm_grouped.available()
        # the blockwise recipe's FP8 products through FBGEMM's 1x128 x 128x128 grouped GEMM
        self.fbgemm_blockwise = (
            not self.rowwise and recipe.grouped_gemm == "fbgemm" and fbgemm_grouped.blockwise_available()
        )

    def _fused(self) -> bool:
        """Quantise with torch operations that Inductor fuses into their producers (only inside a compile)."""
        return self.recipe.fused_quantization and torch.compiler.is_compiling()

    # -- quantisation ------------------------------------------------------------------------------------------
    def quantize_rows(self, x: torch.Tensor, rows_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, C] (any strides) -> q [Rp, Cp] (Rp a multiple of 16 and of rows_multiple), scales [Rp, Cp/128]
        stored column-major, the layout `torch._scaled_mm` wants (rowwise: Cp a multiple of 16, scales [Rp, 1])."""
        rows, cols = x.shape
        rows_out = _ceil_to(rows, max(rows_multiple, 16))
        if self.rowwise:
            return self._quantize_rowwise(x, rows_out, "a row")
        if self._fused():
            padded = F.pad(x, (0, _ceil_to(cols, BLOCK) - cols, 0, rows_out - rows))
            q, scale = quantize_tiles(padded, self.pow2, check=False)
            return q.contiguous(), _col_major(scale)
        cols_out = _ceil_to(cols, BLOCK)
        q = torch.empty(rows_out, cols_out, dtype=FP8, device=x.device)
        scale = torch.empty(cols_out // BLOCK, rows_out, dtype=torch.float32, device=x.device).t()
        block_r = 32 if x.stride(1) == 1 else 64
        grid = (triton.cdiv(rows_out, block_r), cols_out // BLOCK)
        _quant_rows_kernel[grid](
            x, q, scale, rows, cols, rows_out, x.stride(0), x.stride(1), q.stride(0), scale.stride(0),
            scale.stride(1), POW2=self.pow2, BLOCK_R=block_r, num_warps=4,
        )  # fmt: skip
        if self.check:
            check_finite(scale, "a 1x128 activation tile")
        return q, scale

    def quantize_weight_and_amax_t(self, w: torch.Tensor):
        """`quantize_weight(w)` and, from the same read, what `quantize_weight_t(w, q, scale, amax)` takes (rowwise:
        each column's amax where `rowwise_amax_plan` gives a plan, the experts' batched weights; None otherwise)."""
        if not self.rowwise or self._fused():
            return (*self.quantize_weight(w), None)
        q, scale, amax = quantize_rowwise_amax_triton(w, w.shape[-2], _ceil_to(w.shape[-1], 16), self.pow2)
        if self.check:
            check_finite(scale, "a weight row")
        return q, scale, amax

    def quantize_segment_columns(self, t: torch.Tensor, layout: ExpertLayout, row_index=None):
        """The rowwise recipe's weight-gradient operand, `fp8_numerics.quantize_segment_columns` of t over the
        layout's experts (through `row_index` where given): Inductor's fused torch operations inside a compile, else
        two Triton kernels."""
        experts = layout.num_experts
        if self._fused():
            return quantize_segment_columns(t, layout.block_expert, experts, self.pow2, False, row_index)
        q_t, scale = quantize_segment_columns_triton(
            t, layout.block_expert, experts, self.pow2, not _INTERPRET, row_index
        )
        if self.check:
            check_finite(scale, "an expert's column")
        return q_t, scale

    def gather_rows(self, q: torch.Tensor, scale: torch.Tensor, index: torch.Tensor):
        """Rows `index` of `quantize_rows`' result (q, scale), scales in the layout it returns them in."""
        q = q.view(torch.uint8).index_select(0, index).view(FP8)
        scale = scale.index_select(0, index)
        return q, scale if self.rowwise else _col_major(scale)

    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w [(E,) N, K] -> blockwise: q [(E,) Np, Kp] zero-padded, scales [(E,) ceil(N/128), ceil(K/128)];
        rowwise: q [(E,) N, Kp16], scales [(E,) N, 1]."""
        if self.rowwise:
            return self._quantize_rowwise(w, w.shape[-2], "a weight row")
        if self._fused():
            q, scale = quantize_blocks(w, self.pow2, check=False)
            n, k = w.shape[-2:]
            q = F.pad(q.view(torch.uint8), (0, _ceil_to(k, BLOCK) - k, 0, _ceil_to(n, BLOCK) - n)).view(FP8)
            return q.contiguous(), scale
        w3 = w if w.dim() == 3 else w[None]
        q, scale = self._quantize_blocks(w3)
        if self.check:
            check_finite(scale, "a 128x128 weight block")
        return (q[0], scale[0]) if w.dim() == 2 else (q, scale)

    def quantize_weight_t(self, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, prepared=None):
        """The operand of w^T: blockwise, q^T (K-contiguous) with the transposed grid (`prepared`: that q^T, a weight
        copy's); rowwise, w^T requantised (from `prepared`, the column amaxes of `quantize_weight_and_amax_t`, where
        given)."""
        if self.rowwise:
            return self._quantize_rowwise(w.transpose(-1, -2), w.shape[-1], "a weight row", prepared)
        if prepared is not None:
            return prepared, scale.transpose(-1, -2)
        if self._fused():
            return q.transpose(-1, -2).contiguous(), scale.transpose(-1, -2)
        w3 = w if w.dim() == 3 else w[None]
        qt = self._quantize_blocks(w3.transpose(1, 2))[0]  # same blocks, same scales, K-contiguous
        return (qt[0] if w.dim() == 2 else qt), scale.transpose(-1, -2)

    def _quantize_rowwise(
        self, x: torch.Tensor, rows_out: int, what: str, amax: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One scale per row: x [(E,) R, C] (any strides, e.g. a transposed weight) zero-padded to rows_out rows and
        a multiple of 16 columns -> q row-major (cuBLAS wants row-major values; x^T comes transposed), scales
        [(E,) rows_out, 1]. Inductor's fused torch operations inside a compile, else the Triton kernel (given the
        rows' amaxes, a transposed view in one pass)."""
        rows, cols = x.shape[-2:]
        cols_out = _ceil_to(cols, 16)
        if self._fused():
            q, scale = quantize_rowwise(F.pad(x, (0, cols_out - cols, 0, rows_out - rows)), self.pow2, check=False)
            return q.contiguous(), scale.contiguous()
        q, scale = quantize_rowwise_triton(x, rows_out, cols_out, self.pow2, amax=amax)
        if self.check:
            check_finite(scale, what)
        return q, scale

    def _quantize_blocks(self, w3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        experts, n, k = w3.shape
        n_pad, k_pad = _ceil_to(n, BLOCK), _ceil_to(k, BLOCK)
        q = torch.empty(experts, n_pad, k_pad, dtype=FP8, device=w3.device)
        scale = torch.empty(experts, n_pad // BLOCK, k_pad // BLOCK, dtype=torch.float32, device=w3.device)
        _quant_blocks_kernel[(n_pad // BLOCK, k_pad // BLOCK, experts)](
            w3, q, scale, n, k, *w3.stride(), q.stride(0), q.stride(1), *scale.stride(), POW2=self.pow2, num_warps=8
        )
        return q, scale

    # -- GEMMs -------------------------------------------------------------------------------------------------
    def _probe_cublas(self, b_blocks: bool, out_dtype: torch.dtype, device: torch.device) -> bool:
        """Does `torch._scaled_mm` dispatch this blockwise recipe pair, and does it match the emulation?"""
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(256, 512, device=device, generator=gen) * torch.rand(256, 1, device=device, generator=gen)
        b = torch.randn(256, 512, device=device, generator=gen)
        a_q, a_s = self.quantize_rows(a)
        b_q, b_s = self.quantize_weight(b) if b_blocks else self.quantize_rows(b)
        try:
            got = self._scaled_mm(a_q, a_s, b_q, b_s, b_blocks, out_dtype).float()
            want = EmulatedBackend(self.recipe).gemm(a_q, a_s, b_q, b_s, b_blocks, torch.float32)
            ok = bool(((got - want).norm() / want.norm()) < 1e-2)
            if not ok:
                logger.warning("torch._scaled_mm blockwise disagrees with the FP8 emulation; using Triton.")
        except (RuntimeError, ValueError, NotImplementedError) as err:
            logger.info("torch._scaled_mm blockwise unavailable (%s); using Triton.", str(err).splitlines()[0])
            ok = False
        return ok

    @staticmethod
    def _scaled_mm(a, a_scale, b, b_scale, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
        scale_b = b_scale.contiguous().t() if b_blocks else _col_major(b_scale).t()
        return torch._scaled_mm(a, b.t(), scale_a=_col_major(a_scale), scale_b=scale_b, out_dtype=out_dtype)

    def gemm(self, a, a_scale, b, b_scale, b_blocks: bool, out_dtype: torch.dtype, fast_accum: bool = True):
        """a [M, K] @ b[N, K']^T (K' <= K, a zero beyond K'); cuBLAS when shapes and recipe allow, else Triton.
        `fast_accum`: cuBLAS's rowwise products summed without promotion to FP32 (`FP8Recipe.fast_accum`)."""
        (m, k), (n, kb) = a.shape, b.shape
        if self.rowwise:
            if k == kb and k % 16 == 0 and n % 16 == 0 and self.recipe.gemm != "triton":
                out = torch._scaled_mm(
                    a, b.t(), scale_a=a_scale, scale_b=b_scale.reshape(1, -1), out_dtype=torch.bfloat16,
                    use_fast_accum=fast_accum,
                )  # fmt: skip
                return out.to(out_dtype)
            kt = triton.cdiv(kb, BLOCK)  # one scale per row: the same scale for every 128-wide K tile
            a_tiles, b_tiles = a_scale.expand(m, kt), b_scale[None].expand(1, n, kt)
            return self._triton_gemm(a, a_tiles, b[None], b_tiles, None, out_dtype, False)
        shapes_ok = (
            k == kb and k % BLOCK == 0 and m % 16 == 0 and n % (BLOCK if b_blocks else 16) == 0 and b.is_contiguous()
        )
        if shapes_ok and self.cublas[(b_blocks, out_dtype)]:
            if b_blocks and (k // BLOCK) % 4:
                a, a_scale, b, b_scale = _pad_k_blocks(a, a_scale, b, b_scale)
            return self._scaled_mm(a, a_scale, b, b_scale, b_blocks, out_dtype)
        return self._triton_gemm(a, a_scale, b[None], b_scale[None], None, out_dtype, b_blocks)

    def _triton_gemm(self, a, a_scale, b, b_scale, block_expert, out_dtype, b_blocks) -> torch.Tensor:
        m, n, k = a.shape[0], b.shape[1], b.shape[2]
        out = torch.empty(m, n, dtype=out_dtype, device=a.device)
        cfg = self.GEMM_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _gemm_kernel[grid](
            a, a_scale, b, b_scale, out, block_expert if block_expert is not None else a_scale, m, n, k,
            a.stride(0), a_scale.stride(0), a_scale.stride(1), b.stride(0), b.stride(1), *b_scale.stride(),
            out.stride(0), B_BLOCKS=b_blocks, GROUPED=block_expert is not None, EVEN_K=k % BLOCK == 0, **cfg,
        )  # fmt: skip
        return out

    def grouped_gemm(self, a, a_scale, b, b_scale, layout: ExpertLayout, out_dtype: torch.dtype, fast_accum=True):
        if self.rowwise and self.fbgemm:  # rows past the last segment: left undefined, as torch's leaves them
            rows = fbgemm_grouped.segment_rows(layout.seg_start, layout.seg_end)
            return fbgemm_grouped.rowwise_grouped(a, a_scale.reshape(-1), b, b_scale.reshape(b.shape[0], -1), rows).to(
                out_dtype
            )
        if self.rowwise:  # cuBLAS grouped GEMM; rows past the last segment are never read downstream
            out = torch._scaled_grouped_mm(
                a, b.transpose(-2, -1), a_scale.reshape(-1), b_scale.reshape(b.shape[0], -1), offs=layout.seg_end,
                out_dtype=torch.bfloat16, use_fast_accum=fast_accum,
            )  # fmt: skip
            return out.to(out_dtype)
        if self.deep_gemm:
            experts = deep_gemm_grouped.row_experts(layout.block_expert)
            return deep_gemm_grouped.grouped_nt(a, a_scale, b, b_scale, experts).to(out_dtype)
        if self.fbgemm_blockwise:
            return fbgemm_grouped.blockwise_grouped(a, a_scale, b, b_scale, layout.seg_start, layout.seg_end).to(
                out_dtype
            )
        return self._triton_gemm(a, a_scale, b, b_scale, layout.block_expert, out_dtype, True)

    def grouped_gemm_nn(self, a, a_scale, w, w_scale, layout: ExpertLayout, out_dtype: torch.dtype) -> torch.Tensor:
        """a [R, N] (1x128 tiles) times W[e] [N, K] per segment, W and its 128x128 block scales as `quantize_weight`
        gave them for the forward (DeepGEMM's kernel: `self.deep_gemm` only)."""
        experts = deep_gemm_grouped.row_experts(layout.block_expert)
        return deep_gemm_grouped.grouped_nn(a, a_scale, w, w_scale, experts).to(out_dtype)

    def grouped_wgrad(self, a, a_scale, b, b_scale, layout: ExpertLayout) -> torch.Tensor:
        """Per expert e: a[:, rows of e] @ b[:, rows of e]^T; a [N, R] and b [K, R] scaled along their rows: per
        1x128 tile (blockwise: the Triton kernel, float32 out), or per (expert, row) (rowwise: the scales [E, N] and
        [E, K] of `quantize_segment_columns`; torch's `_scaled_grouped_mm` over the two 2-D operands split at the
        segments' ends, bf16 out)."""
        if self.rowwise:
            return torch._scaled_grouped_mm(
                a, b.t(), a_scale.reshape(-1), b_scale.reshape(-1), offs=layout.seg_end, out_dtype=torch.bfloat16,
                use_fast_accum="grad_weight" in self.recipe.fast_accum,
            )  # fmt: skip
        n, k = a.shape[0], b.shape[0]
        out = torch.empty(layout.num_experts, n, k, dtype=torch.float32, device=a.device)
        cfg = self.WGRAD_CONFIG
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]), layout.num_experts)
        _wgrad_kernel[grid](
            a, a_scale, b, b_scale, out, layout.seg_start, layout.seg_end, n, k, a.stride(0), *a_scale.stride(),
            b.stride(0), *b_scale.stride(), out.stride(0), out.stride(1), **cfg,
        )  # fmt: skip
        return out
