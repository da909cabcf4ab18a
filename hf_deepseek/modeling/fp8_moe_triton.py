"""Triton kernels of `fp8_moe.py` (imported only where Triton runs): the routed experts' SwiGLU, its gradient and the
combine's gradient, each writing its bf16 result and, from the registers that hold it, that result's FP8 rows
(one scale a row), the quantisation of `fp8_triton.quantize_rowwise_triton` bit for bit: the same scale, the same
E4M3 encoding (`_row_scales`, `_encode_e4m3`). A program takes whole rows, so a row's amax never leaves it.

Every output row-pads as the backend's `quantize_rows` does: q [ceil16(R), ceil16(C)], scales [ceil16(R), 1], zero
past the input's rows and columns."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_numerics import _INTERPRET, FP8, _ceil_to
from .fp8_triton import _abs_bits, _bits_to_float, _encode_e4m3, _row_scales

FAST = not _INTERPRET  # the GPU's division and cast (see fp8_triton); the interpreter runs the reference arithmetic
ELEMENTS = 4096  # elements of a row block a program holds: 16 per thread at 8 warps
WARPS = 8


@triton.jit
def _quantise_rows_store(v, rows, cols, q_ptr, s_ptr, s_q, R_OUT, C_OUT, POW2: tl.constexpr, FAST: tl.constexpr):
    """Quantise a block of whole rows v [BLOCK_R, BLOCK_C] (bf16, zero past the input) and store them with their
    scales, rows below R_OUT and columns below C_OUT."""
    scale, inv = _row_scales(_bits_to_float(tl.max(_abs_bits(v), axis=1), v.dtype), POW2)
    q = _encode_e4m3(v.to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
    out_rows = rows < R_OUT
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * s_q + cols[None, :], q,
             mask=out_rows[:, None] & (cols < C_OUT)[None, :])  # fmt: skip
    tl.store(s_ptr + rows, scale, mask=out_rows)


@triton.jit
def _swiglu_rows_kernel(
    gu_ptr, h_ptr, q_ptr, s_ptr, R, INTER, R_OUT, INTER_OUT, s_gu, s_h, s_q,
    POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    """h = silu(gate) * up for BLOCK_R rows of gu = (gate | up) [R, 2 INTER], rounded as `fp8_moe.swiglu_reference`
    (silu(gate) to h's dtype, then the product); then the stored values' FP8 rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_I)
    r64 = rows.to(tl.int64)[:, None]
    inside = (rows < R)[:, None] & (cols < INTER)[None, :]
    gate = tl.load(gu_ptr + r64 * s_gu + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + r64 * s_gu + INTER + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(h_ptr.dtype.element_ty).to(tl.float32)
    h = (silu * up).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + r64 * s_h + cols[None, :], h, mask=inside)
    _quantise_rows_store(h, rows, cols, q_ptr, s_ptr, s_q, R_OUT, INTER_OUT, POW2, FAST)


@triton.jit
def _swiglu_backward_rows_kernel(
    dh_ptr, gu_ptr, dgu_ptr, q_ptr, s_ptr, R, INTER, R_OUT, C_OUT, s_dh, s_gu, s_dgu, s_q,
    POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    """d(gate | up) of h = silu(gate) * up given dh [R, INTER], for BLOCK_R rows, rounded as
    `fp8_moe.swiglu_backward_reference`; then the stored values' FP8 rows (one scale over both halves: a row of the
    gate/up input gradient's operand)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_I)
    r64 = rows.to(tl.int64)[:, None]
    inside = (rows < R)[:, None] & (cols < INTER)[None, :]
    dh = tl.load(dh_ptr + r64 * s_dh + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(gu_ptr + r64 * s_gu + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + r64 * s_gu + INTER + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = (gate * sig).to(dgu_ptr.dtype.element_ty).to(tl.float32)
    d_silu = (dh * up).to(dgu_ptr.dtype.element_ty).to(tl.float32)
    d_gate = (d_silu * (sig * (1 + gate * (1 - sig)))).to(dgu_ptr.dtype.element_ty)
    d_up = (dh * silu).to(dgu_ptr.dtype.element_ty)
    tl.store(dgu_ptr + r64 * s_dgu + cols[None, :], d_gate, mask=inside)
    tl.store(dgu_ptr + r64 * s_dgu + INTER + cols[None, :], d_up, mask=inside)
    amax = tl.maximum(tl.max(_abs_bits(d_gate), axis=1), tl.max(_abs_bits(d_up), axis=1))
    scale, inv = _row_scales(_bits_to_float(amax, dgu_ptr.dtype.element_ty), POW2)
    q_gate = _encode_e4m3(d_gate.to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
    q_up = _encode_e4m3(d_up.to(tl.float32), scale[:, None], inv[:, None], POW2, FAST)
    out_rows = (rows < R_OUT)[:, None]
    q_rows = q_ptr + r64 * s_q
    tl.store(q_rows + cols[None, :], q_gate, mask=out_rows & (cols < INTER)[None, :])
    tl.store(
        q_rows + INTER + cols[None, :], q_up, mask=out_rows & (INTER + cols < C_OUT)[None, :]
    )  # and the zero padding
    tl.store(s_ptr + rows, scale, mask=rows < R_OUT)


@triton.jit
def _combine_backward_rows_kernel(
    do_ptr, tok_ptr, w_ptr, y_ptr, dy_ptr, q_ptr, s_ptr, dw_ptr, N, R, R_OUT, D, D_OUT, s_do, s_y, s_dy, s_q,
    POW2: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """For BLOCK_R laid-out rows r (token t = tok[r], N for a padding row; routing weight w[r], taken in dy's
    dtype): dy[r] = d_out[t] * w[r] in dy's dtype and its FP8 row; dw[r] = <d_out[t], y[r]>, each product rounded
    to dy's dtype, summed in float32, rounded to dy's dtype, stored in float32 (zero for padding rows)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    in_rows = rows < R
    token = tl.load(tok_ptr + rows, mask=in_rows, other=N)
    weight = tl.load(w_ptr + rows, mask=in_rows, other=0.0).to(dy_ptr.dtype.element_ty).to(tl.float32)
    valid = (token < N)[:, None] & (cols < D)[None, :]
    d_out = tl.load(do_ptr + token.to(tl.int64)[:, None] * s_do + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    dy = (d_out * weight[:, None]).to(dy_ptr.dtype.element_ty)
    r64 = rows.to(tl.int64)[:, None]
    tl.store(dy_ptr + r64 * s_dy + cols[None, :], dy, mask=in_rows[:, None] & (cols < D)[None, :])
    _quantise_rows_store(dy, rows, cols, q_ptr, s_ptr, s_q, R_OUT, D_OUT, POW2, FAST)
    y = tl.load(y_ptr + r64 * s_y + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    dtype = dy_ptr.dtype.element_ty
    dw = tl.sum((d_out * y).to(dtype).to(tl.float32), axis=1).to(dtype).to(tl.float32)
    tl.store(dw_ptr + rows, dw, mask=in_rows)


def _outputs(rows: int, cols: int, like: torch.Tensor):
    rows_out, cols_out = _ceil_to(rows, 16), _ceil_to(cols, 16)
    q = torch.empty(rows_out, cols_out, dtype=FP8, device=like.device)
    return q, torch.empty(rows_out, 1, dtype=torch.float32, device=like.device), rows_out, cols_out


def _row_block(cols_out: int) -> tuple[int, int]:
    """(rows, columns) of a program's block: whole rows, a power of two wide, ELEMENTS elements or one row."""
    block_c = triton.next_power_of_2(cols_out)
    return max(1, ELEMENTS // block_c), block_c


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_rows_triton(gate_up: torch.Tensor, pow2: bool):
    """gate_up [R, 2I] -> (h [R, I] in gate_up's dtype, its FP8 rows q [ceil16(R), ceil16(I)], scales)."""
    gate_up = _row_major(gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    q, scale, rows_out, cols_out = _outputs(rows, inter, gate_up)
    block_r, block_i = _row_block(cols_out)
    _swiglu_rows_kernel[(triton.cdiv(rows_out, block_r),)](
        gate_up, h, q, scale, rows, inter, rows_out, cols_out, gate_up.stride(0), h.stride(0), q.stride(0),
        POW2=pow2, FAST=FAST, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=WARPS,
    )  # fmt: skip
    return h, q, scale


def swiglu_backward_rows_triton(d_h: torch.Tensor, gate_up: torch.Tensor, pow2: bool):
    """d_h [R, I], gate_up [R, 2I] -> (d(gate | up) [R, 2I] in gate_up's dtype, its FP8 rows, scales)."""
    d_h, gate_up = _row_major(d_h), _row_major(gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    d_gate_up = torch.empty_like(gate_up)
    q, scale, rows_out, cols_out = _outputs(rows, 2 * inter, gate_up)
    block_r, block_i = _row_block(cols_out - inter)  # the up half's columns and the padding after them
    _swiglu_backward_rows_kernel[(triton.cdiv(rows_out, block_r),)](
        d_h, gate_up, d_gate_up, q, scale, rows, inter, rows_out, cols_out, d_h.stride(0), gate_up.stride(0),
        d_gate_up.stride(0), q.stride(0), POW2=pow2, FAST=FAST, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=WARPS,
    )  # fmt: skip
    return d_gate_up, q, scale


def combine_backward_rows_triton(d_out, token_pad, row_weight, y, pow2: bool):
    """`fp8_moe.combine_backward_reference` with d_y's FP8 rows: (d_y, q, scales, d_row_weight)."""
    d_out, y = _row_major(d_out), _row_major(y)
    (tokens, hidden), rows = d_out.shape, token_pad.shape[0]
    d_y = torch.empty(rows, hidden, dtype=d_out.dtype, device=d_out.device)
    d_row_weight = torch.empty(rows, dtype=torch.float32, device=d_out.device)
    q, scale, rows_out, cols_out = _outputs(rows, hidden, d_out)
    block_r, block_d = _row_block(cols_out)
    _combine_backward_rows_kernel[(triton.cdiv(rows_out, block_r),)](
        d_out, token_pad, row_weight, y, d_y, q, scale, d_row_weight, tokens, rows, rows_out, hidden, cols_out,
        d_out.stride(0), y.stride(0), d_y.stride(0), q.stride(0),
        POW2=pow2, FAST=FAST, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=WARPS,
    )  # fmt: skip
    return d_y, q, scale, d_row_weight
