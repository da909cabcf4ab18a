"""Triton split-KV decode attention over the latent cache, for small batches (the kernels behind
`mla_decode_triton.py`).

At batch 1 FlashMLA's decode is bound by its launches (schedule, split-KV, combine), not by the 2.4 MB it reads per
layer. Here one program per (row, KV split, head block) loads a [BLOCK_T, 576] cache tile once and serves all its
heads (every head shares the latent: MQA), with an online softmax over the split's tiles; it writes its unnormalised
output [heads, 512] and (max, sum) per head to an fp32 workspace. A second small kernel combines a row's splits.
Splits past a row's length exit at once, so a short row costs little; the split count is static (from L_max and B).
"""

import torch
import triton
import triton.language as tl

from ._pdl_triton import pdl_wait
from .moe_gemv_config import pdl_arguments

LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    q_ptr, qr_ptr, kv_ptr, len_ptr, part_ptr, stat_ptr,
    stride_qb, stride_qh, stride_rb, stride_rh, stride_kb, stride_kt,
    heads, scale_log2,
    SPLITS: tl.constexpr, SPLIT_LEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    LATENT: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_wait(PDL)  # every input (the query, the cache and its lengths) an earlier kernel writes
    row, split, hblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(len_ptr + row)
    start = split * SPLIT_LEN
    if start < length:
        h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = h < heads
        d = tl.arange(0, LATENT)
        r = tl.arange(0, ROPE)
        q_row = q_ptr + row * stride_qb + h[:, None] * stride_qh
        q_lat = tl.load(q_row + d[None, :], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, LATENT]
        qr_row = qr_ptr + row * stride_rb + h[:, None] * stride_rh  # the roped part: its own tensor or q's tail
        q_rope = tl.load(qr_row + r[None, :], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, ROPE]
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, LATENT], tl.float32)
        end = tl.minimum(start + SPLIT_LEN, length)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < end
            kv_row = kv_ptr + row * stride_kb + t[:, None] * stride_kt
            kv = tl.load(kv_row + d[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, LATENT]: key and value
            k_rope = tl.load(kv_row + LATENT + r[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, ROPE]
            s = tl.dot(q_lat, tl.trans(kv)) + tl.dot(q_rope, tl.trans(k_rope))  # [BLOCK_H, BLOCK_T] fp32
            s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
            m_i = m_new
        base = (row * SPLITS + split) * heads + h
        tl.store(part_ptr + base[:, None] * LATENT + d[None, :], acc, mask=h_ok[:, None])
        tl.store(stat_ptr + base * 2, m_i, mask=h_ok)
        tl.store(stat_ptr + base * 2 + 1, l_i, mask=h_ok)


@triton.jit
def _combine_kernel(
    part_ptr, stat_ptr, len_ptr, out_ptr, stride_ob, stride_oh, heads,
    SPLITS: tl.constexpr, SPLIT_LEN: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, LATENT: tl.constexpr,
    wuv_ptr=None, stride_wh=0, stride_wv=0, V: tl.constexpr = 0, BLOCK_V: tl.constexpr = 32,
    V_PROGRAM: tl.constexpr = 0, PDL: tl.constexpr = False,
):  # fmt: skip
    """A row's splits combined for one head: the latent output [LATENT], or with V > 0 that output rounded to
    out's dtype (as the unfused path stores it) and taken through the head's W_UV [V, LATENT] (rows stride_wv
    apart, heads stride_wh): [V], V_PROGRAM of its values a program (program_id(2); each combines the splits
    itself, from L2, so that W_UV's reads spread over more multiprocessors). PDL: `_pdl_triton.pdl_wait`'s."""
    pdl_wait(PDL)
    row, head = tl.program_id(0), tl.program_id(1)
    live_splits = tl.minimum(tl.cdiv(tl.load(len_ptr + row), SPLIT_LEN), SPLITS)
    s = tl.arange(0, BLOCK_S)
    m = tl.load(stat_ptr + ((row * SPLITS + s) * heads + head) * 2, mask=s < live_splits, other=float("-inf"))
    m_max = tl.maximum(tl.max(m, axis=0), -1e30)  # a row of length 0 has no live split: output 0, not NaN
    d = tl.arange(0, LATENT)
    acc = tl.zeros([LATENT], tl.float32)
    weighted_sums = tl.zeros([CHUNK], tl.float32)
    for c in range(0, live_splits, CHUNK):  # CHUNK splits' partial outputs at a time: registers stay few
        sc = c + tl.arange(0, CHUNK)
        live = sc < live_splits
        base = (row * SPLITS + sc) * heads + head
        w = tl.exp2(tl.load(stat_ptr + base * 2, mask=live, other=float("-inf")) - m_max)
        weighted_sums += w * tl.load(stat_ptr + base * 2 + 1, mask=live, other=0.0)
        parts = tl.load(part_ptr + base[:, None] * LATENT + d[None, :], mask=live[:, None], other=0.0)
        acc += tl.sum(parts * w[:, None], axis=0)
    out = acc / tl.maximum(tl.sum(weighted_sums, axis=0), 1e-30)
    if V == 0:
        tl.store(out_ptr + row * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))
    else:
        latent = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        for v0 in tl.static_range(0, V_PROGRAM, BLOCK_V):  # BLOCK_V rows of W_UV at a time: registers stay few
            v = tl.program_id(2) * V_PROGRAM + v0 + tl.arange(0, BLOCK_V)
            v_ok = v < V
            w = tl.load(wuv_ptr + head * stride_wh + v[:, None] * stride_wv + d[None, :], mask=v_ok[:, None], other=0.0)
            o = tl.sum(w.to(tl.float32) * latent[None, :], axis=1)
            tl.store(out_ptr + row * stride_ob + head * stride_oh + v, o.to(out_ptr.dtype.element_ty), mask=v_ok)


TARGET_PROGRAMS = 128  # about one per H200 multiprocessor (132)


def plan(
    batch: int, heads: int, max_len: int, block_t: int = 32, target_programs: int = TARGET_PROGRAMS
) -> tuple[int, int, int]:
    """(BLOCK_H, splits, split length): head blocks of up to 32 (tl.dot needs 16 rows), splits so that about
    `target_programs` programs run, each split a whole number of `block_t` tiles."""
    block_h = min(32, max(16, triton.next_power_of_2(heads)))
    head_blocks = triton.cdiv(heads, block_h)
    tiles = triton.cdiv(max_len, block_t)
    splits = max(1, min(tiles, triton.cdiv(target_programs, batch * head_blocks)))
    split_len = triton.cdiv(tiles, splits) * block_t
    return block_h, triton.cdiv(max_len, split_len), split_len


def launch(
    query,
    storage,
    lengths,
    scale: float,
    latent: int = 512,
    block_t: int = 32,
    target_programs: int = TARGET_PROGRAMS,
    query_rope=None,
    w_uv=None,
) -> torch.Tensor:
    """query [B, H, latent + rope], or [B, H, latent] with its roped part `query_rope` [B, H, rope] apart (no join
    before the launch); storage [B, L, latent + rope] (last dim contiguous; both dims powers of two), lengths [B]
    int32 -> [B, H, latent], or with `w_uv` [H, v, latent] (any strides but the last) the output through each
    head's W_UV in the combine kernel: [B, H, v]. `block_t` (cache tokens a tile) and `target_programs` as `plan`
    takes them (`mla_decode_triton.PLAN` in the model)."""
    batch, heads, width = query.shape
    query = query.to(storage.dtype)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if query_rope is None:
        rope, query_rope = width - latent, query[..., latent:]
    else:
        rope, query_rope = query_rope.shape[-1], query_rope.to(storage.dtype)
        if query_rope.stride(-1) != 1:
            query_rope = query_rope.contiguous()
    max_len = storage.shape[1]
    block_h, splits, split_len = plan(batch, heads, max_len, block_t, target_programs)
    part = torch.empty(batch, splits, heads, latent, device=query.device, dtype=torch.float32)
    stat = torch.empty(batch, splits, heads, 2, device=query.device, dtype=torch.float32)
    pdl = pdl_arguments(query.device)  # both kernels' launch arguments for programmatic dependent launch
    v = 0 if w_uv is None else w_uv.shape[1]
    out = torch.empty(batch, heads, v or latent, device=query.device, dtype=storage.dtype)
    _split_kernel[(batch, splits, triton.cdiv(heads, block_h))](
        query, query_rope, storage, lengths, part, stat,
        query.stride(0), query.stride(1), query_rope.stride(0), query_rope.stride(1), storage.stride(0),
        storage.stride(1), heads, scale * LOG2E,
        SPLITS=splits, SPLIT_LEN=split_len, BLOCK_T=block_t, BLOCK_H=block_h, LATENT=latent, ROPE=rope,
        num_warps=4 if block_h <= 16 else 8, num_stages=2, **pdl,
    )  # fmt: skip
    epilogue = {}
    if w_uv is not None:
        w_uv = w_uv.to(storage.dtype)
        if w_uv.stride(-1) != 1:
            w_uv = w_uv.contiguous()
        block_v = min(32, triton.next_power_of_2(v))
        # W_UV's rows over about TARGET_PROGRAMS programs (a head's 128 KB read by one program took 75 us a step on
        # an H100, 2026-12-05c), whole BLOCK_V chunks each
        v_splits = max(1, min(triton.cdiv(v, block_v), TARGET_PROGRAMS // (batch * heads)))
        v_program = triton.cdiv(triton.cdiv(v, v_splits), block_v) * block_v
        epilogue = dict(wuv_ptr=w_uv, stride_wh=w_uv.stride(0), stride_wv=w_uv.stride(1), V=v, BLOCK_V=block_v,
                        V_PROGRAM=v_program)  # fmt: skip
    _combine_kernel[(batch, heads, triton.cdiv(v, epilogue["V_PROGRAM"]) if v else 1)](
        part, stat, lengths, out, out.stride(0), out.stride(1), heads,
        SPLITS=splits, SPLIT_LEN=split_len, BLOCK_S=triton.next_power_of_2(splits), CHUNK=8, LATENT=latent,
        num_warps=4, **epilogue, **pdl,
    )  # fmt: skip
    return out
