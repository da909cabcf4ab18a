"""The Triton kernels of `moe_gemv.py` (imported only where Triton and CUDA exist). With `SCALED` the weights are
FP8 with DeepSeek's 128x128 block scales (`weight_scale_inv`), dequantised in registers: half the bytes read.

Variants for more bytes in flight (`moe_gemv_config.KernelConfig`, the `config` argument): SPLIT_K > 1 adds a third grid
axis over C chunks of K; the gate/up kernel then stores its fp32 partial sums in h [pairs, C, 2I], the down kernel
sums a pair's C chunks of h in order as it reads them and computes SiLU(gate) * up (rounded to the activation's
dtype as the unsplit kernel stores it), and stores its own partial sums per chunk of I in the fp32 output
[pairs, C', d], which the caller sums (in the step's graph, with the sum over the top-k). No atomics: every sum is
taken in a fixed order, so a split launch gives the same bits on every run. STAGES asks
Triton's software pipeliner for that many stages on the K loop (`tl.range(num_stages=)`); None leaves the loop as
before. The defaults (SPLIT_K 1, STAGES None) compile to the kernels as they were."""

import torch
import triton
import triton.language as tl

from ._pdl_triton import pdl_start, prefetch_rows
from .counters import counters
from .moe_gemv_config import (
    HEAD_MIN_ROWS,
    KernelConfig,
    kernel_config,
    launch_options,
    pdl_arguments,
    prefetch_lines,
    split_chunk,
)

BLOCK_N, BLOCK_K, WARPS = KernelConfig().block_n, KernelConfig().block_k, KernelConfig().warps
# `launch(..., fused=True)`: the token-expert pairs its counters hold, and its persistent programs a multiprocessor
# (all resident at once: a down block spins until other programs' gate/up blocks are done)
FUSED_MAX_PAIRS = 64
FUSED_PROGRAMS_PER_SM = 2  # at most: fewer where registers or shared memory would not hold two (`resident_programs`)
_FUSED_PROGRAMS: dict[tuple, int] = {}  # a launch's programs by what its compiled kernel depends on, found once


@triton.jit
def _gate_up_kernel(
    x_ptr, idx_ptr, w_ptr, u_ptr, s_ptr, act_ptr, D, INTER, TOP_K, G_INTER, G_D, K_CHUNK,
    SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr = 1,
    STAGES: tl.constexpr = None, ROUTED: tl.constexpr = True, sg_ptr=None, su_ptr=None, N_SHARED: tl.constexpr = 0,
    sgs_ptr=None, sus_ptr=None, PDL: tl.constexpr = False, LINES: tl.constexpr = 0, LINE: tl.constexpr = 64,
    us_ptr=None, UP_SCALES_APART: tl.constexpr = False,
):  # fmt: skip
    """act[p, n] = SiLU(gate[e_p, n] . x[t_p]) * (up[e_p, n] . x[t_p]) for a block of n; gate rows [0, I), up rows
    [I, 2I) of the expert's [2I, d] matrix. SCALED: gate scales [G_INTER, G_D], then up's, per expert. SPLIT_K > 1:
    this program's K_CHUNK of d only (a multiple of BLOCK_K), and act_ptr is the fp32 h [P, C, 2I] whose chunk
    c = program_id(2) of C = num_programs(2) takes this program's gate and up partial sums. The up rows are read at
    u_ptr (the expert's row I for routed experts; a second matrix otherwise). Not ROUTED: one gate [I, d] and one up
    matrix [I, d] (a SwiGLU MLP's), each program of axis 0 a row of x (TOP_K 1; idx unread). N_SHARED > 0: the last
    N_SHARED of each token's TOP_K pairs are a shared MLP's slices, rows [j I, (j + 1) I) of its gate and up
    matrices at sg_ptr and su_ptr (SCALED: their block scales at sgs_ptr and sus_ptr, I a multiple of 128), and idx
    holds only the TOP_K - N_SHARED routed experts of each token. PDL, LINES, LINE: `_pdl_triton.pdl_start`'s (the
    gate matrix's lines prefetched: LINES 0 where routing picks the matrix). UP_SCALES_APART (not ROUTED, SCALED):
    the up matrix's block scales at us_ptr, not after the gate's (a SwiGLU MLP's two FP8 layers)."""
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pdl_start(w_ptr, D, n, n < INTER, 0, D, PDL, LINES, LINE)
    _gate_up_block(x_ptr, idx_ptr, w_ptr, u_ptr, s_ptr, act_ptr, D, INTER, TOP_K, G_INTER, G_D, K_CHUNK,
                   tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(2),
                   SCALED, BLOCK_N, BLOCK_K, SPLIT_K, STAGES, ROUTED, sg_ptr, su_ptr, N_SHARED, sgs_ptr, sus_ptr,
                   us_ptr, UP_SCALES_APART)  # fmt: skip


@triton.jit
def _gate_up_block(
    x_ptr, idx_ptr, w_ptr, u_ptr, s_ptr, act_ptr, D, INTER, TOP_K, G_INTER, G_D, K_CHUNK, pair, block, chunk, chunks,
    SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
    ROUTED: tl.constexpr, sg_ptr, su_ptr, N_SHARED: tl.constexpr, sgs_ptr, sus_ptr, us_ptr,
    UP_SCALES_APART: tl.constexpr,
):  # fmt: skip
    """`_gate_up_kernel`'s work for token-expert pair `pair`, block `block` of I and (SPLIT_K > 1) chunk `chunk` of
    the `chunks` of d."""
    n0 = block * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    token = pair // TOP_K
    expert = 0
    if ROUTED and N_SHARED == 0:
        expert = tl.load(idx_ptr + pair).to(tl.int64)
    w = w_ptr + expert * (2 * INTER) * D
    u = u_ptr + expert * (2 * INTER) * D
    sg = s_ptr + expert * (2 * G_INTER) * G_D  # SCALED: the gate's scales, [G_INTER, G_D]; the up's after them
    su = sg + G_INTER * G_D
    if UP_SCALES_APART:
        su = us_ptr
    if N_SHARED > 0:
        slot = pair % TOP_K
        routed_k = TOP_K - N_SHARED
        if slot < routed_k:
            chosen = tl.load(idx_ptr + token * routed_k + slot).to(tl.int64)
            w = w_ptr + chosen * (2 * INTER) * D
            u = u_ptr + chosen * (2 * INTER) * D
            if SCALED:
                sg = s_ptr + chosen * (2 * G_INTER) * G_D
                su = sg + G_INTER * G_D
        else:
            w = sg_ptr + (slot - routed_k).to(tl.int64) * INTER * D
            u = su_ptr + (slot - routed_k).to(tl.int64) * INTER * D
            if SCALED:  # slice j's rows start at block row j G_INTER of the shared matrices' scales
                sg = sgs_ptr + (slot - routed_k) * G_INTER * G_D
                su = sus_ptr + (slot - routed_k) * G_INTER * G_D
    n_ok = n < INTER
    k_lo = 0
    k_hi = D
    if SPLIT_K > 1:
        k_lo = chunk * K_CHUNK
        k_hi = tl.minimum(k_lo + K_CHUNK, D)
    acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        xk = tl.load(x_ptr + token * D + k, mask=k_ok, other=0.0).to(tl.float32)
        mask = n_ok[:, None] & k_ok[None, :]
        gate = tl.load(w + n[:, None] * D + k[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(u + n[:, None] * D + k[None, :], mask=mask, other=0.0).to(tl.float32)
        x_gate = xk
        x_up = xk
        if SCALED:  # the block's rows lie in one 128-row block of scales (launch checks 128 % BLOCK_N == 0): the
            # scale depends on k only, so it multiplies the vector (BLOCK_K products), not the tile (BLOCK_N x more)
            scale_at = (n0 // 128) * G_D + k // 128
            x_gate = xk * tl.load(sg + scale_at, mask=k_ok, other=0.0)
            x_up = xk * tl.load(su + scale_at, mask=k_ok, other=0.0)
        acc_gate += tl.sum(gate * x_gate[None, :], axis=1)
        acc_up += tl.sum(up * x_up[None, :], axis=1)
    if SPLIT_K > 1:
        h = act_ptr + (pair * chunks + chunk) * (2 * INTER)
        tl.store(h + n, acc_gate, mask=n_ok)
        tl.store(h + INTER + n, acc_up, mask=n_ok)
    else:
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        tl.store(act_ptr + pair * INTER + n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_dot(act_ptr, row, w, w_row, s, s_row, n, n0, n_ok, k_lo, k_hi, D, INTER, H_CHUNKS,
              SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
              ACT_FROM_H: tl.constexpr, ACT_PAST_L1: tl.constexpr):  # fmt: skip
    """down[expert, n] . act[row] over INTER[k_lo:k_hi], fp32 [BLOCK_N] (see `_down_kernel`); the matrix's rows
    `w_row` apart (INTER, or a shared MLP's whole width for one of its slices); SCALED: its block scales from `s`,
    rows `s_row` apart. ACT_FROM_H: act_ptr is h [rows, H_CHUNKS, 2I], its chunks summed in order. ACT_PAST_L1: the
    activation read past L1 (".cg": an activation written by other programs of the same launch)."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < INTER
        mask = n_ok[:, None] & k_ok[None, :]
        if ACT_FROM_H:
            h_gate = tl.zeros([BLOCK_K], dtype=tl.float32)
            h_up = tl.zeros([BLOCK_K], dtype=tl.float32)
            for c in range(H_CHUNKS):  # in chunk order: the same sums on every run
                h = act_ptr + (row * H_CHUNKS + c) * (2 * INTER)
                h_gate += tl.load(h + k, mask=k_ok, other=0.0)
                h_up += tl.load(h + INTER + k, mask=k_ok, other=0.0)
            a = h_gate * tl.sigmoid(h_gate) * h_up  # the unsplit gate/up kernel's expression, then its rounding
            if ACT_FROM_H == 1:
                a = a.to(tl.bfloat16).to(tl.float32)
            elif ACT_FROM_H == 2:
                a = a.to(tl.float16).to(tl.float32)
        else:
            if ACT_PAST_L1:
                a = tl.load(act_ptr + row * INTER + k, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            else:
                a = tl.load(act_ptr + row * INTER + k, mask=k_ok, other=0.0).to(tl.float32)
        down = tl.load(w + n[:, None] * w_row + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if SCALED:  # the block scale depends on k only within the tile's rows: scale the vector, not the tile
            a *= tl.load(s + (n0 // 128) * s_row + k // 128, mask=k_ok, other=0.0)
        acc += tl.sum(down * a[None, :], axis=1)
    return acc


@triton.jit
def _down_kernel(
    act_ptr, idx_ptr, weight_ptr, w_ptr, s_ptr, out_ptr, D, INTER, G_INTER, G_D, K_CHUNK, TOP_K,
    SCALED: tl.constexpr, ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1, STAGES: tl.constexpr = None, ACT_FROM_H: tl.constexpr = 0,
    SUM_TOP_K: tl.constexpr = False, sd_ptr=None, SD_ROW=0, N_SHARED: tl.constexpr = 0, sds_ptr=None, H_CHUNKS=1,
    PDL: tl.constexpr = False, LINES: tl.constexpr = 0, LINE: tl.constexpr = 64,
):  # fmt: skip
    """out[p, n] = routing_weight[p] * (down[e_p, n] . act[p]) in fp32, for a block of n. SCALED: scales
    [G_D, G_INTER] per expert. Not ROUTED: one matrix and no routing weights (idx and weight pointers unread), each
    row of act a plain matrix-vector product (an FP8 linear layer). SPLIT_K > 1: this program's K_CHUNK of INTER,
    its partial sums stored at chunk c = program_id(2) of out [P, C, d] (C = num_programs(2)), for the caller to
    sum. SUM_TOP_K (ROUTED, SPLIT_K 1): program 0's axis is the token, which sums its TOP_K pairs' products in
    order and stores the token's row of out in out's dtype (no sum or conversion kernel after). ACT_FROM_H (1: round
    to bf16, 2: to fp16, 3: keep fp32): act_ptr is the split gate/up kernel's fp32 h [P, H_CHUNKS, 2I], its chunks
    summed in order, and act = SiLU(h[:, :I]) * h[:, I:] computed here. N_SHARED > 0 (ROUTED, not SUM_TOP_K): as in
    `_gate_up_kernel`, the last N_SHARED pairs of each token are a shared MLP's slices, columns [j I, (j + 1) I) of
    its down matrix at sd_ptr (rows SD_ROW apart; SCALED: its block scales at sds_ptr), weighted 1; idx and the
    routing weights hold the routed pairs only. PDL, LINES, LINE: `_pdl_triton.pdl_start`'s (the matrix's lines
    prefetched from this program's chunk of K on: LINES 0 where routing picks the matrix)."""
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < D
    prefetch_from = 0
    if SPLIT_K > 1:
        prefetch_from = tl.program_id(2) * K_CHUNK
    pdl_start(w_ptr, INTER, n, n_ok, prefetch_from, INTER, PDL, LINES, LINE)
    if SUM_TOP_K:
        token = tl.program_id(0)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in range(0, TOP_K):
            pair = token * TOP_K + j
            expert = tl.load(idx_ptr + pair).to(tl.int64)
            acc = _down_dot(act_ptr, pair, w_ptr + expert * D * INTER, INTER, s_ptr + expert * G_D * G_INTER, G_INTER,
                            n, n0, n_ok, 0, INTER, D, INTER, 1,
                            SCALED, BLOCK_N, BLOCK_K, STAGES, ACT_FROM_H, False)  # fmt: skip
            total += acc * tl.load(weight_ptr + pair).to(tl.float32)
        tl.store(out_ptr + token * D + n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        _down_block(act_ptr, idx_ptr, weight_ptr, w_ptr, s_ptr, out_ptr, D, INTER, G_INTER, G_D, K_CHUNK, TOP_K,
                    tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(2),
                    SCALED, ROUTED, BLOCK_N, BLOCK_K, SPLIT_K, STAGES, ACT_FROM_H, sd_ptr, SD_ROW, N_SHARED, sds_ptr,
                    H_CHUNKS)  # fmt: skip


@triton.jit
def _down_block(
    act_ptr, idx_ptr, weight_ptr, w_ptr, s_ptr, out_ptr, D, INTER, G_INTER, G_D, K_CHUNK, TOP_K, pair, block, chunk,
    chunks, SCALED: tl.constexpr, ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, STAGES: tl.constexpr, ACT_FROM_H: tl.constexpr, sd_ptr, SD_ROW, N_SHARED: tl.constexpr,
    sds_ptr, H_CHUNKS, FUSED: tl.constexpr = False, ready_ptr=None, READY=0, LINES: tl.constexpr = 0,
    LINE: tl.constexpr = 64,
):  # fmt: skip
    """`_down_kernel`'s work (not SUM_TOP_K) for token-expert pair `pair`, block `block` of d and (SPLIT_K > 1)
    chunk `chunk` of the `chunks` of I. FUSED (`_experts_kernel`): the pair's activation is written by other
    programs of the same launch, which count its READY blocks at ready_ptr[pair]; this block asks L2 for the first
    LINES lines (LINE elements apart) of its weight rows, waits for the count, then reads the activation past L1."""
    n0 = block * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < D
    expert = 0
    if ROUTED and N_SHARED == 0:
        expert = tl.load(idx_ptr + pair).to(tl.int64)
    k_lo = 0
    k_hi = INTER
    if SPLIT_K > 1:
        k_lo = chunk * K_CHUNK
        k_hi = tl.minimum(k_lo + K_CHUNK, INTER)
    w = w_ptr + expert * D * INTER
    w_row = INTER
    s = s_ptr + expert * G_D * G_INTER  # SCALED: the matrix's block scales, rows s_row apart
    s_row = G_INTER
    if N_SHARED > 0:
        slot = pair % TOP_K
        routed_k = TOP_K - N_SHARED
        routed_pair = (pair // TOP_K) * routed_k + slot
        if slot < routed_k:
            chosen = tl.load(idx_ptr + routed_pair).to(tl.int64)
            w = w_ptr + chosen * D * INTER
            if SCALED:
                s = s_ptr + chosen * G_D * G_INTER
        else:
            w = sd_ptr + (slot - routed_k).to(tl.int64) * INTER
            w_row = SD_ROW
            if SCALED:  # slice j's columns start at block column j G_INTER of the shared down's scales
                s = sds_ptr + (slot - routed_k) * G_INTER
                s_row = N_SHARED * G_INTER
    if FUSED:
        prefetch_rows(w, w_row, n, n_ok, k_lo, k_hi, LINES, LINE)
        _wait_count(ready_ptr + pair, READY)
        acc = _down_dot(act_ptr, pair, w, w_row, s, s_row, n, n0, n_ok, k_lo, k_hi, D, INTER, H_CHUNKS,
                        SCALED, BLOCK_N, BLOCK_K, STAGES, ACT_FROM_H, True)  # fmt: skip
    else:
        acc = _down_dot(act_ptr, pair, w, w_row, s, s_row, n, n0, n_ok, k_lo, k_hi, D, INTER, H_CHUNKS,
                        SCALED, BLOCK_N, BLOCK_K, STAGES, ACT_FROM_H, False)  # fmt: skip
    if ROUTED and N_SHARED > 0:  # the shared slices' weight is 1
        acc *= tl.load(weight_ptr + routed_pair, mask=slot < routed_k, other=1.0).to(tl.float32)
    elif ROUTED:
        acc *= tl.load(weight_ptr + pair).to(tl.float32)
    if SPLIT_K > 1:
        tl.store(out_ptr + (pair * chunks + chunk) * D + n, acc, mask=n_ok)
    else:
        tl.store(out_ptr + pair * D + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _wait_count(count_ptr, want):
    """Spin until the int32 at count_ptr reaches `want`; the stores counted before it are then visible to this
    program's loads after it (acquire, and a block barrier after)."""
    seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    while seen < want:
        seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _experts_kernel(
    x_ptr, idx_ptr, weight_ptr, gate_up_ptr, up_ptr, gate_up_s_ptr, act_ptr, down_ptr, down_s_ptr, out_ptr,
    ready_ptr, done_ptr, D, INTER, TOP_K, G_INTER, G_D, PAIRS, D_CHUNK,
    SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    D_BLOCK_N: tl.constexpr, D_BLOCK_K: tl.constexpr, D_SPLIT_K: tl.constexpr, D_STAGES: tl.constexpr,
    sg_ptr=None, su_ptr=None, sd_ptr=None, SD_ROW=0, N_SHARED: tl.constexpr = 0, sgs_ptr=None, sus_ptr=None,
    sds_ptr=None, LINES: tl.constexpr = 0, LINE: tl.constexpr = 64,
):  # fmt: skip
    """`_gate_up_kernel` (without split-K) and then `_down_kernel` (per pair, not SUM_TOP_K) in one launch of
    persistent programs: the PAIRS x cdiv(I, BLOCK_N) gate/up blocks come first in the work list, then the down
    blocks (pair, block of d, chunk of I), each program taking every num_programs-th item in order. A pair's down
    blocks wait on ready_ptr[pair], which its gate/up blocks count up as they store its activation; the last of a
    pair's down blocks to finish (counted at done_ptr[pair]) sets both counters back to zero for the next launch.
    Every program takes its gate/up items before its down items and never waits in them, so with all programs
    resident every wait ends. The sums are the two kernels' own (the same bits as their two launches)."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    up_blocks = tl.cdiv(INTER, BLOCK_N)
    gate_up_items = PAIRS * up_blocks
    chunks = tl.cdiv(INTER, D_CHUNK)
    down_per_pair = tl.cdiv(D, D_BLOCK_N) * chunks
    for item in range(pid, gate_up_items + PAIRS * down_per_pair, programs):
        if item < gate_up_items:
            pair = item // up_blocks
            _gate_up_block(x_ptr, idx_ptr, gate_up_ptr, up_ptr, gate_up_s_ptr, act_ptr, D, INTER, TOP_K, G_INTER, G_D,
                           D, pair, item % up_blocks, 0, 1, SCALED, BLOCK_N, BLOCK_K, 1, STAGES, True, sg_ptr, su_ptr,
                           N_SHARED, sgs_ptr, sus_ptr, None, False)  # fmt: skip
            tl.debug_barrier()  # every thread's stores of the block issued before they are counted
            tl.atomic_add(ready_ptr + pair, 1, sem="release", scope="gpu")
        else:
            pair = (item - gate_up_items) // down_per_pair
            rest = (item - gate_up_items) % down_per_pair
            _down_block(act_ptr, idx_ptr, weight_ptr, down_ptr, down_s_ptr, out_ptr, D, INTER, G_INTER, G_D, D_CHUNK,
                        TOP_K, pair, rest // chunks, rest % chunks, chunks, SCALED, True, D_BLOCK_N, D_BLOCK_K,
                        D_SPLIT_K, D_STAGES, 0, sd_ptr, SD_ROW, N_SHARED, sds_ptr, 1, True, ready_ptr, up_blocks,
                        LINES, LINE)  # fmt: skip
            tl.debug_barrier()
            if tl.atomic_add(done_ptr + pair, 1, sem="acq_rel", scope="gpu") == down_per_pair - 1:
                tl.atomic_xchg(ready_ptr + pair, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(done_ptr + pair, 0, sem="relaxed", scope="gpu")


@triton.jit
def _pair_kernel(x_ptr, w1_ptr, w2_ptr, out_ptr, N1, N2, K,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                 PDL: tl.constexpr = False, LINES: tl.constexpr = 0, LINE: tl.constexpr = 64,
                 SCALED: tl.constexpr = False, s1_ptr=None, s2_ptr=None, G_K=1):  # fmt: skip
    """out[t, :N1] = w1 . x[t] and out[t, N1:] = w2 . x[t] (two linear layers of one input, [N1, K] and [N2, K])
    for row t (program_id(0)) and a block of n (program_id(1): w1's blocks, then w2's). SCALED: FP8 weights with
    their 128x128 block scales [ceil(N/128), G_K] (`_down_dot`'s, as an FP8 layer's own launch applies them). PDL,
    LINES, LINE: `_pdl_triton.pdl_start`'s."""
    _pair_block(x_ptr, w1_ptr, w2_ptr, out_ptr, N1, N2, K, tl.program_id(0), tl.program_id(1), BLOCK_N, BLOCK_K,
                STAGES, PDL, LINES, LINE, SCALED, s1_ptr, s2_ptr, G_K)  # fmt: skip


@triton.jit
def _pair_half(block, N1, N2, w1_ptr, w2_ptr, s1_ptr, s2_ptr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr):
    """Where output block `block` of two layers [N1, K] and [N2, K] of one input falls (w1's blocks, then w2's):
    (1 in the second layer, else 0; the block's index in its layer; that layer's rows; its weight; its block scales,
    the weight again where not SCALED)."""
    first_blocks = tl.cdiv(N1, BLOCK_N)
    second = (block >= first_blocks).to(tl.int32)
    if second == 1:  # noqa: SIM108 (a branch Triton compiles to a select of the two pointers)
        w = w2_ptr
    else:
        w = w1_ptr
    if SCALED:
        if second == 1:  # noqa: SIM108
            s = s2_ptr
        else:
            s = s1_ptr
    else:
        s = w
    return second, block - second * first_blocks, N1 + second * (N2 - N1), w, s


@triton.jit
def _pair_block(x_ptr, w1_ptr, w2_ptr, out_ptr, N1, N2, K, row, block,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
                LINES: tl.constexpr, LINE: tl.constexpr, SCALED: tl.constexpr, s1_ptr, s2_ptr, G_K):  # fmt: skip
    """`_pair_kernel`'s work for row `row` and output block `block` (w1's blocks, then w2's)."""
    second, local, rows, w, s = _pair_half(block, N1, N2, w1_ptr, w2_ptr, s1_ptr, s2_ptr, BLOCK_N, SCALED)
    n0 = local * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < rows
    pdl_start(w, K, n, n_ok, 0, K, PDL, LINES, LINE)
    acc = _down_dot(x_ptr, row, w, K, s, G_K, n, n0, n_ok, 0, K, rows, K, 1,
                    SCALED, BLOCK_N, BLOCK_K, STAGES, 0, False)  # fmt: skip
    tl.store(out_ptr + row * (N1 + N2) + second * N1 + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _norm_gemv_kernel(x_ptr, g_ptr, w_ptr, out_ptr, N, K, stride_x, eps,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      s_ptr=None, G_K=1, SCALED: tl.constexpr = False):  # fmt: skip
    """out[t, n] = w[n] . RMSNorm(x[t]) for row t (program_id(0)) and a block of n (program_id(1)), the norm as
    `layers.RMSNorm` computes it: x * rsqrt(mean(x^2) + eps) in fp32 rounded to out's dtype, times g, rounded again.
    Every program recomputes the row's mean square (K values, from cache) before its product loop. SCALED: w is an
    FP8 weight with 128x128 block scales [ceil(N/128), G_K] at s (the tile's rows within one block row)."""
    _norm_gemv_block(x_ptr, g_ptr, w_ptr, out_ptr, N, K, stride_x, eps, tl.program_id(0), tl.program_id(1),
                     BLOCK_N, BLOCK_K, STAGES, s_ptr, G_K, SCALED, N)  # fmt: skip


@triton.jit
def _norm_pair_kernel(x_ptr, g_ptr, w1_ptr, w2_ptr, out_ptr, N1, N2, K, stride_x, eps,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      SCALED: tl.constexpr = False, s1_ptr=None, s2_ptr=None, G_K=1):  # fmt: skip
    """`_pair_kernel` of RMSNorm(x) (weight g, eps), the norm in each program's prologue as `_norm_gemv_kernel`
    takes it: out[t, :N1] = w1 . RMSNorm(x[t]) and out[t, N1:] = w2 . RMSNorm(x[t]) (a decoder layer's input norm
    with MLA's q_a and kv_a projections in one launch)."""
    second, local, rows, w, s = _pair_half(tl.program_id(1), N1, N2, w1_ptr, w2_ptr, s1_ptr, s2_ptr, BLOCK_N, SCALED)
    _norm_gemv_block(x_ptr, g_ptr, w, out_ptr + second * N1, rows, K, stride_x, eps, tl.program_id(0), local,
                     BLOCK_N, BLOCK_K, STAGES, s, G_K, SCALED, N1 + N2)  # fmt: skip


@triton.jit
def _norm_gemv_block(x_ptr, g_ptr, w_ptr, out_ptr, N, K, stride_x, eps, row, block,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, s_ptr, G_K,
                     SCALED: tl.constexpr, stride_out):  # fmt: skip
    """`_norm_gemv_kernel`'s work for row `row` and output block `block` (output rows `stride_out` apart)."""
    n0 = block * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < N
    x_row = x_ptr + row * stride_x
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        squares += xk * xk
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        dtype = out_ptr.dtype.element_ty  # the norm's two roundings, as RMSNorm's eager ops make them
        normed = (tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32) * rstd).to(dtype).to(tl.float32)
        a = (tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32) * normed).to(dtype).to(tl.float32)
        if SCALED:  # the block scale depends on k only within the tile's rows: scale the vector, not the tile
            a *= tl.load(s_ptr + (n0 // 128) * G_K + k // 128, mask=k_ok, other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(out_ptr + row * stride_out + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


_ACT_ROUNDING = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def launch(
    x,
    indices,
    weights,
    gate_up,
    down,
    config=None,
    gate_up_scale=None,
    down_scale=None,
    sum_top_k: bool = False,
    per_pair: bool = False,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    shared_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    down_config=None,
    fused: bool = False,
    programs: int | None = None,
) -> torch.Tensor:
    """`config`: a `moe_gemv_config.KernelConfig` or a tuple (BLOCK_N, BLOCK_K, warps[, split_k[, stages]]) for both
    kernels (the tuning script tries several), unless `down_config` gives the down kernel's; by default
    `moe_gemv_config.CONFIG` and `DOWN_CONFIG` (`FP8_CONFIG` and `FP8_DOWN_CONFIG` for FP8 weights). Each kernel's
    split-K is its own: the gate/up kernel's splits d (the down kernel then sums its partial h and applies SiLU), the
    down kernel's splits I (the output holds each pair's partial sums). With the two scales, gate_up and down are FP8
    weights with their block scales; the activation is kept in x's dtype. `sum_top_k` (`moe_gemv.SUM_TOP_K` in the
    model): without split-K, the down kernel sums each token's top-k products itself and stores x's dtype (one program a
    token and block of outputs), instead of one program a token-expert pair followed by torch's sum over k and
    conversion (two more kernels a layer). `per_pair` (not with `sum_top_k`): the pairs' fp32 products [N, k, d]
    unsummed, for the caller to sum (with split-K [N, k C, d]: each pair's partial sums over the C chunks of I,
    consecutive; `moe_gemv.output_slots`). `shared` (not with `sum_top_k`): a shared MLP's (gate [S I, d], up [S I, d],
    down [d, S I]) computed as S more pairs of each token, its slices of width I weighted 1, after the routed ones (k +
    S pairs a token); with FP8 experts the MLP's weights are FP8 too and `shared_scales` holds their three block-scale
    grids (I a multiple of 128). `fused` (not with `sum_top_k`, nor a split gate/up kernel, nor more than
    `FUSED_MAX_PAIRS` pairs; otherwise ignored): both kernels' work in one launch of `programs` persistent programs
    (`_experts_kernel`; by default `FUSED_PROGRAMS_PER_SM` a multiprocessor), the same result."""
    scaled = gate_up_scale is not None
    block_n, block_k, warps, split_k, stages = kernel_config(config, fp8=scaled)
    if down_config is None and config is not None:  # one configuration given: both kernels' (as before)
        down_config = config
    d_block_n, d_block_k, d_warps, d_split_k, d_stages = kernel_config(down_config, fp8=scaled, down=True)
    num_tokens, top_k = indices.shape
    n_shared = 0
    if shared is not None:
        if sum_top_k or (gate_up_scale is None) != (shared_scales is None):
            raise ValueError("shared experts go with per-pair outputs, FP8 ones with FP8 experts (scales for both)")
        if shared_scales is not None and down.shape[-1] % 128:
            raise ValueError(f"FP8 shared slices need the experts' width a multiple of 128, got {down.shape[-1]}")
        n_shared = shared[0].shape[0] // down.shape[-1]
        shared = tuple(t.contiguous() for t in shared)
        if shared_scales is not None:
            shared_scales = tuple(t.float().contiguous() for t in shared_scales)
        top_k += n_shared
    pairs, dim, inter = num_tokens * top_k, x.shape[-1], down.shape[-1]
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    flat_idx, flat_w = indices.reshape(-1).contiguous(), weights.reshape(-1).contiguous()
    if scaled:
        _check_scaled_block(block_n)
        _check_scaled_block(d_block_n)
        gate_up_scale, down_scale = gate_up_scale.float().contiguous(), down_scale.float().contiguous()
    g_inter, g_dim = triton.cdiv(inter, 128), triton.cdiv(dim, 128)
    act_dtype = x.dtype if scaled else gate_up.dtype
    sum_top_k = sum_top_k and split_k == 1 and d_split_k == 1 and top_k > 1
    chunk_d, chunk_i = split_chunk(dim, split_k, block_k), split_chunk(inter, d_split_k, d_block_k)
    chunks_d, chunks_i = triton.cdiv(dim, chunk_d), triton.cdiv(inter, chunk_i)
    if split_k > 1:  # h, the gate and up partial sums per chunk of d
        act = torch.empty(pairs * chunks_d * 2 * inter, device=x.device, dtype=torch.float32)
    else:
        act = torch.empty(pairs, inter, device=x.device, dtype=act_dtype)
    if d_split_k > 1:  # the pairs' partial sums per chunk of I
        out = torch.empty(pairs * chunks_i * dim, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((num_tokens, dim) if sum_top_k else (pairs, dim), device=x.device,
                          dtype=x.dtype if sum_top_k else torch.float32)  # fmt: skip
    pdl = pdl_arguments(x.device)  # routing picks the weights
    extra = dict(sg_ptr=shared[0], su_ptr=shared[1], N_SHARED=n_shared) if shared else {}
    if shared_scales:
        extra.update(sgs_ptr=shared_scales[0], sus_ptr=shared_scales[1])
    down_extra = dict(sd_ptr=shared[2], SD_ROW=shared[2].shape[1]) if shared else {}
    if shared_scales:
        down_extra.update(sds_ptr=shared_scales[2])
    if fused and not sum_top_k and split_k == 1 and pairs <= FUSED_MAX_PAIRS:
        count = counters("moe_experts", 2 * FUSED_MAX_PAIRS, x.device)  # [ready a pair, done a pair]
        lines, line = prefetch_lines(chunk_i, down.element_size()) if x.is_cuda else (0, 64)  # no PTX: interpreter
        items = pairs * (triton.cdiv(inter, block_n) + triton.cdiv(dim, d_block_n) * chunks_i)
        args = (
            x, flat_idx, flat_w, gate_up, gate_up[:, inter:], gate_up_scale if scaled else gate_up, act, down,
            down_scale if scaled else down, out, count, count[FUSED_MAX_PAIRS:], dim, inter, top_k, g_inter, g_dim,
            pairs, chunk_i,
        )  # fmt: skip
        options = dict(SCALED=scaled, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, D_BLOCK_N=d_block_n,
                       D_BLOCK_K=d_block_k, D_SPLIT_K=d_split_k, D_STAGES=d_stages, LINES=lines, LINE=line, **extra,
                       **down_extra, **launch_options(max(warps, d_warps), stages))  # fmt: skip
        if programs is None:  # every program resident: as many a multiprocessor as its registers and memory allow
            key = (x.device, x.dtype, gate_up.dtype, n_shared, block_n, block_k, stages, d_block_n, d_block_k,
                   d_split_k, d_stages, lines, max(warps, d_warps))  # fmt: skip
            if key not in _FUSED_PROGRAMS:
                compiled = _experts_kernel.warmup(*args, grid=(1,), **options)
                per_sm = min(FUSED_PROGRAMS_PER_SM, resident_programs(compiled, max(warps, d_warps), x.device))
                _FUSED_PROGRAMS[key] = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
            programs = _FUSED_PROGRAMS[key]
        _experts_kernel[(min(items, programs),)](*args, **options)
    else:
        _gate_up_kernel[(pairs, triton.cdiv(inter, block_n), chunks_d)](
            x, flat_idx, gate_up, gate_up[:, inter:], gate_up_scale if scaled else gate_up, act, dim, inter, top_k,
            g_inter, g_dim, chunk_d,
            SCALED=scaled, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, STAGES=stages, **extra,
            **launch_options(warps, stages), **pdl,
        )  # fmt: skip
        _down_kernel[(num_tokens if sum_top_k else pairs, triton.cdiv(dim, d_block_n), chunks_i)](
            act, flat_idx, flat_w, down, down_scale if scaled else down, out, dim, inter, g_inter, g_dim, chunk_i,
            top_k, SCALED=scaled, ROUTED=True, BLOCK_N=d_block_n, BLOCK_K=d_block_k, SPLIT_K=d_split_k,
            STAGES=d_stages, ACT_FROM_H=_ACT_ROUNDING[act_dtype] if split_k > 1 else 0, SUM_TOP_K=sum_top_k,
            H_CHUNKS=chunks_d, N_SHARED=n_shared, **down_extra,
            **launch_options(d_warps, d_stages), **pdl,
        )  # fmt: skip
    if sum_top_k:
        return out
    slots = top_k * (chunks_i if d_split_k > 1 else 1)  # split-K: each pair's partial sums, consecutive
    if per_pair:
        return out.view(num_tokens, slots, dim)
    return out.view(num_tokens, slots, dim).sum(dim=1).to(x.dtype)


def resident_programs(compiled, warps: int, device: torch.device) -> int:
    """How many programs of a compiled kernel of `warps` warps one multiprocessor of `device` holds at once: its
    registers (allocated 256 a warp at a time), shared memory (1 KB of it reserved a program) and threads."""
    compiled._init_handles()  # loads the binary: its register count
    props = torch.cuda.get_device_properties(device)
    per_warp = -(-compiled.n_regs * 32 // 256) * 256
    by_registers = getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * warps)
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    by_shared = props.shared_memory_per_multiprocessor // (compiled.metadata.shared + 1024)
    return max(1, min(by_registers, by_threads, by_shared))


def _check_scaled_block(block_n: int) -> None:
    if 128 % block_n:
        raise ValueError(f"FP8 weights need BLOCK_N dividing the 128-row scale blocks, got {block_n}")


def launch_linear(x, weight, scale=None, config=None) -> torch.Tensor:
    """x [T, K] @ W^T -> [T, N] in x's dtype: the down kernel over one matrix, each row a matrix-vector product. W
    is `weight` [N, K] (bf16), or with `scale` [ceil(N/128), ceil(K/128)] the FP8 weight dequantised by its block
    scales. `config` as `launch`'s, by default `moe_gemv_config.LINEAR_CONFIG` (`LINEAR_FP8_CONFIG` for FP8;
    `HEAD_FP8_CONFIG` for an FP8 weight of at least `HEAD_MIN_ROWS` rows, an LM head).
    Without split-K the kernel stores x's dtype itself (its fp32 sums rounded to nearest even on the store, as
    `.to()` rounds them): no conversion kernel after it."""
    scaled = scale is not None
    head = scaled and weight.shape[0] >= HEAD_MIN_ROWS
    block_n, block_k, warps, split_k, stages = kernel_config(config, fp8=scaled, linear=True, head=head)
    if scaled:
        _check_scaled_block(block_n)
    rows, (n, k) = x.shape[0], weight.shape
    x = x.contiguous()
    chunk = split_chunk(k, split_k, block_k)
    chunks = triton.cdiv(k, chunk)
    launch_opts = {**launch_options(warps, stages), **pdl_arguments(x.device, chunk, weight.element_size())}
    if split_k > 1:  # the rows' fp32 partial sums per chunk of K, summed in order after the kernel
        out = torch.empty(rows, chunks, n, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    weight = weight.contiguous()
    _down_kernel[(rows, triton.cdiv(n, block_n), chunks)](
        x, x, x, weight, scale.float().contiguous() if scaled else weight, out, n, k, triton.cdiv(k, 128),
        triton.cdiv(n, 128), chunk, 1, SCALED=scaled, ROUTED=False, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, STAGES=stages, **launch_opts,
    )  # fmt: skip
    return out if split_k == 1 else out.sum(dim=1).to(x.dtype)


def launch_gate_up(x, gate, up, config=None, gate_scale=None, up_scale=None) -> torch.Tensor:
    """x [T, K] -> SiLU(x @ gate^T) * (x @ up^T) [T, I] in x's dtype, gate and up [I, K] bf16, or FP8 with their
    128x128 block scales `gate_scale` and `up_scale` (a SwiGLU MLP's two input projections in one launch, the
    activation applied in registers): the gate/up kernel over one pair of matrices, each row of x a matrix-vector
    product. `config` as `launch_linear`'s (its split-K is not used; FP8: `LINEAR_FP8_CONFIG` by default)."""
    scaled = gate_scale is not None
    block_n, block_k, warps, _, stages = kernel_config(config, fp8=scaled, linear=True)
    rows, (inter, dim) = x.shape[0], gate.shape
    x, gate, up = x.contiguous(), gate.contiguous(), up.contiguous()
    act = torch.empty(rows, inter, device=x.device, dtype=x.dtype)
    s_ptr, g_inter, g_dim = gate, 1, 1  # the scales' arguments, unread without them
    if scaled:
        _check_scaled_block(block_n)
        s_ptr, g_inter, g_dim = gate_scale.float().contiguous(), triton.cdiv(inter, 128), triton.cdiv(dim, 128)
    _gate_up_kernel[(rows, triton.cdiv(inter, block_n), 1)](
        x, x, gate, up, s_ptr, act, dim, inter, 1, g_inter, g_dim, dim,
        SCALED=scaled, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, ROUTED=False,
        us_ptr=up_scale.float().contiguous() if scaled else None, UP_SCALES_APART=scaled,
        **launch_options(warps, stages), **pdl_arguments(x.device, dim, gate.element_size()),
    )  # fmt: skip
    return act


def _pair_scales(block_n: int, k: int, first_scale, second_scale) -> dict:
    """The pair kernels' FP8 arguments (both layers' 128x128 block scales, K's blocks), checked; {} for bf16."""
    if first_scale is None:
        return {}
    _check_scaled_block(block_n)
    return dict(SCALED=True, s1_ptr=first_scale.float().contiguous(), s2_ptr=second_scale.float().contiguous(),
                G_K=triton.cdiv(k, 128))  # fmt: skip


def launch_linear_pair(x, first, second, config=None, first_scale=None, second_scale=None) -> torch.Tensor:
    """x [T, K] -> [x @ first^T, x @ second^T] joined [T, N1 + N2] in x's dtype, first [N1, K] and second [N2, K]
    bf16, or FP8 with their 128x128 block scales `first_scale` and `second_scale` (two linear layers of one input,
    such as MLA's q_a and kv_a projections, in one launch). `config` as `launch_linear`'s (its split-K is not
    used; FP8: `LINEAR_FP8_CONFIG` by default, as each layer's own launch)."""
    scaled = first_scale is not None
    block_n, block_k, warps, _, stages = kernel_config(config, fp8=scaled, linear=True)
    rows, (n1, k), n2 = x.shape[0], first.shape, second.shape[0]
    x, first, second = x.contiguous(), first.contiguous(), second.contiguous()
    out = torch.empty(rows, n1 + n2, device=x.device, dtype=x.dtype)
    scales = _pair_scales(block_n, k, first_scale, second_scale)
    _pair_kernel[(rows, triton.cdiv(n1, block_n) + triton.cdiv(n2, block_n))](
        x, first, second, out, n1, n2, k, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, **scales,
        **launch_options(warps, stages), **pdl_arguments(x.device, k, first.element_size()),
    )  # fmt: skip
    return out


def launch_norm_linear(x, norm_weight, eps: float, weight, config=None, scale=None) -> torch.Tensor:
    """x [T, K] (rows with unit stride, any row stride) -> weight @ RMSNorm(x) [T, N] in x's dtype, the norm
    `layers.RMSNorm`'s with `norm_weight` [K] and `eps`, in the same launch as the matrix-vector product (bf16
    weight [N, K], or with `scale` [ceil(N/128), ceil(K/128)] an FP8 weight dequantised by its block scales).
    `config` as `launch_linear`'s (its split-K is not used)."""
    scaled = scale is not None
    block_n, block_k, warps, _, stages = kernel_config(config, fp8=scaled, linear=True)
    rows, (n, k) = x.shape[0], weight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    scales = {}
    if scaled:
        _check_scaled_block(block_n)
        scales = dict(s_ptr=scale.float().contiguous(), G_K=triton.cdiv(k, 128), SCALED=True)
    _norm_gemv_kernel[(rows, triton.cdiv(n, block_n))](
        x, norm_weight.contiguous(), weight.contiguous(), out, n, k, x.stride(0), eps, BLOCK_N=block_n,
        BLOCK_K=block_k, STAGES=stages, **scales, **launch_options(warps, stages),
    )  # fmt: skip
    return out


def launch_norm_linear_pair(x, norm_weight, eps: float, first, second, config=None, first_scale=None,
                            second_scale=None) -> torch.Tensor:  # fmt: skip
    """`launch_linear_pair` of RMSNorm(x) (`launch_norm_linear`'s norm, `norm_weight` [K] and `eps`) in the same
    launch: x [T, K] (rows with unit stride) -> [T, N1 + N2] in x's dtype."""
    scaled = first_scale is not None
    block_n, block_k, warps, _, stages = kernel_config(config, fp8=scaled, linear=True)
    rows, (n1, k), n2 = x.shape[0], first.shape, second.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    first, second = first.contiguous(), second.contiguous()
    out = torch.empty(rows, n1 + n2, device=x.device, dtype=x.dtype)
    scales = _pair_scales(block_n, k, first_scale, second_scale)
    _norm_pair_kernel[(rows, triton.cdiv(n1, block_n) + triton.cdiv(n2, block_n))](
        x, norm_weight.contiguous(), first, second, out, n1, n2, k, x.stride(0), eps, BLOCK_N=block_n,
        BLOCK_K=block_k, STAGES=stages, **scales, **launch_options(warps, stages),
    )  # fmt: skip
    return out


def launch_linear_fp8(x, weight, scale, config=None) -> torch.Tensor:
    """`launch_linear` for an FP8 weight and its 128x128 block scales."""
    return launch_linear(x, weight, scale, config)
