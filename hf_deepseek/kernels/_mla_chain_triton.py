"""The Triton kernel of `mla_chain.py` (imported only where Triton and CUDA exist): one decode row's MLA input chain,
q_a and kv_a, then q_b with the q_a norm, then the front (`_mla_front_triton`), in one persistent launch.

At batch 1 each of those three launches takes 5.7-6.6 us whatever it reads (docs/PERF.md 2026-12-06: 2-9 MB each,
1-3 us of it at copy bandwidth), so a layer's chain pays three launch ramps for work one could do. Here a grid of
`programs` (all resident at once: a few per multiprocessor) walks each phase's work items in turn, the three
kernels' own programs (`_pair_block`, `_norm_gemv_block`, `_front_program`) with their sums, so the results are
theirs (bit for bit in Triton's interpreter; q_b's wider blocks below may order a row's sum differently on a GPU,
within one rounding); between phases a grid barrier (`_grid_sync`) makes one phase's stores visible to the next
phase's loads.

The weights of phases 2 and 3 (q_b's 9.4 MB and W_UK's 2 MB at the bench's shapes) do not depend on the phases
before them: each program first asks L2 for its later items' weight lines (`_prefetch_l2`), so that those reads
overlap phase 1's and the later phases find their weights in L2 after the barriers. q_b's rows go in blocks of
Q_BLOCK_N (16: 192 blocks, one round of the grid) rather than the dense layers' 8.

`PHASE` 0 runs the three phases with the barriers; 1, 2 or 3 runs that phase alone, without a barrier or prefetch:
Triton's interpreter runs a grid's programs one after another, so a spinning barrier would never open there, and the
checks run the phases as three launches (`launch(..., phased=True)`).
"""

import torch
import triton
import triton.language as tl

from ._mla_front_triton import _front_program, block_sizes
from ._moe_gemv_triton import _norm_gemv_block, _pair_block
from ._pdl_triton import _prefetch_l2
from .counters import counters

LINE = tl.constexpr(64)  # bf16 values a 128-byte cache line holds


@triton.jit
def _grid_sync(sync_ptr, programs):
    """A sense-reversing grid barrier over `programs` resident programs: slot 0 counts arrivals, slot 1 is the
    generation the last arrival moves on (after setting the count back to 0). Stores before it are visible to every
    program's loads after it (release by each arrival, acquire by each waiter, a block barrier on both sides)."""
    tl.debug_barrier()  # every thread's stores of the phase issued before thread 0 releases them
    generation = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    if tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") == programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        seen = generation
        while seen == generation:
            seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _chain_kernel(
    x_ptr, wqa_ptr, wkva_ptr, qkv_ptr, N1, N2, D,
    gq_ptr, eps_q, wqb_ptr, q_ptr, NQ,
    cos_ptr, sin_ptr, gkv_ptr, eps_kv, wuk_ptr, cache_ptr, len_ptr, sem_ptr, out_ptr, lens_ptr, sync_ptr,
    H, NOPE, R, HALF, CACHE_LEN, stride_wh, stride_wk, stride_wn, stride_cachet,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, Q_BLOCK_N: tl.constexpr,
    FRONT_N: tl.constexpr, FRONT_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr, PHASE: tl.constexpr, Q_LINES: tl.constexpr = 32, FRONT_LINES: tl.constexpr = 1,
    NOPE_PAD: tl.constexpr = 128,
):  # fmt: skip
    """One row: qkv = [W_qa x | W_kva x] (N1 + N2 values), q = W_qb RMSNorm_q(qkv[:N1]) (NQ = H (NOPE + 2 HALF)),
    then the front over q and qkv[N1:] (the joined query at out [H, R + 2 HALF], the cache entry at the length).
    Q_LINES: lines of a q_b row (N1 / LINE, padded); FRONT_LINES: lines of a W_UK block row (FRONT_N / LINE);
    NOPE_PAD: NOPE padded to a power of two."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    n_blocks = tl.cdiv(R, FRONT_N) + 1  # the front's blocks of the latent a head, the last the cache writer's
    if PHASE == 0:  # the later phases' weights into L2 while phase 1 reads its own
        q_cols = tl.minimum(tl.arange(0, Q_LINES) * LINE, N1 - 1)
        for block in range(pid, tl.cdiv(NQ, Q_BLOCK_N), programs):
            rows = tl.minimum(block * Q_BLOCK_N + tl.arange(0, Q_BLOCK_N), NQ - 1)
            _prefetch_l2(wqb_ptr + rows[:, None] * N1 + q_cols[None, :])
        k = tl.minimum(tl.arange(0, NOPE_PAD), NOPE - 1)
        for item in range(pid, n_blocks * H, programs):
            block, head = item % n_blocks, item // n_blocks
            if block < n_blocks - 1:  # the writer's item reads no W_UK
                n = tl.minimum(block * FRONT_N + tl.arange(0, FRONT_LINES) * LINE, R - 1)
                _prefetch_l2(wuk_ptr + head * stride_wh + k[:, None] * stride_wk + n[None, :] * stride_wn)
    if PHASE == 0 or PHASE == 1:
        for block in range(pid, tl.cdiv(N1, BLOCK_N) + tl.cdiv(N2, BLOCK_N), programs):
            _pair_block(x_ptr, wqa_ptr, wkva_ptr, qkv_ptr, N1, N2, D, 0, block, BLOCK_N, BLOCK_K, STAGES,
                        False, 0, 64, False, wqa_ptr, wqa_ptr, 1)  # fmt: skip
    if PHASE == 0:
        _grid_sync(sync_ptr, programs)
    if PHASE == 0 or PHASE == 2:
        for block in range(pid, tl.cdiv(NQ, Q_BLOCK_N), programs):
            _norm_gemv_block(qkv_ptr, gq_ptr, wqb_ptr, q_ptr, NQ, N1, N1 + N2, eps_q, 0, block, Q_BLOCK_N, BLOCK_K,
                             STAGES, wqb_ptr, 1, False, NQ)  # fmt: skip
    if PHASE == 0:
        _grid_sync(sync_ptr, programs)
    if PHASE == 0 or PHASE == 3:
        width = NOPE + 2 * HALF
        for item in range(pid, n_blocks * H, programs):
            _front_program(
                item % n_blocks, item // n_blocks, 0, n_blocks, H,
                q_ptr, qkv_ptr + N1, cos_ptr, sin_ptr, gkv_ptr, wuk_ptr, cache_ptr, len_ptr, sem_ptr, out_ptr,
                lens_ptr, 1, H, NOPE, R, HALF, CACHE_LEN, eps_kv,
                H * width, width, N1 + N2, 0, 0, stride_wh, stride_wk, stride_wn, H * (R + 2 * HALF), R + 2 * HALF,
                0, stride_cachet, 1, FRONT_N, FRONT_K, BLOCK_R, BLOCK_HALF, INTERLEAVED, None,
            )  # fmt: skip


PROGRAMS_PER_SM = 2  # resident together: each program holds one item's registers, a few KB of shared memory
Q_BLOCK_N = 16  # q_b's rows a block: 192 blocks at the bench's 3072 rows, within one round of the grid


def grid_programs(device: torch.device) -> int:
    """How many programs the chain runs: a few per multiprocessor, all of them resident at once (the barrier spins
    until every program has arrived, so a program waiting for a free multiprocessor would never come)."""
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def launch(x, w_qa, w_kva, g_q, eps_q, w_qb, cos, sin, g_kv, eps_kv, w_uk, storage, length, interleaved: bool,
           config=None, programs: int | None = None, phased: bool = False):  # fmt: skip
    """x [1, d] (bf16), W_qa [N1, d], W_kva [r + rope, d], q_a's norm weight [N1], W_qb [H (nope + rope), N1], cos /
    sin [1, rope / 2], kv_a's norm weight [r], W_UK [H, nope, r] (any strides), storage [1, L, r + rope], length (one
    element) -> (the joined query [1, H, r + rope], the row's new length [1] int32); storage and length written as
    `mla_front.reference` writes them. `config`: the dense layers' (BLOCK_N, BLOCK_K, warps, _, stages), by default
    `moe_gemv_config.LINEAR_CONFIG`. `phased`: three launches, one a phase, no barrier (the interpreter's way)."""
    from .moe_gemv_config import kernel_config, launch_options

    block_n, block_k, warps, _, stages = kernel_config(config, linear=True)
    n1, n2, nq = w_qa.shape[0], w_kva.shape[0], w_qb.shape[0]
    heads, nope, latent = w_uk.shape
    rope = n2 - latent
    device = x.device
    qkv = torch.empty(1, n1 + n2, device=device, dtype=x.dtype)
    q = torch.empty(1, nq, device=device, dtype=x.dtype)
    out = torch.empty(1, heads, latent + rope, device=device, dtype=x.dtype)
    lengths = torch.empty(1, device=device, dtype=torch.int32)
    front = block_sizes(1, heads, latent, nope, rope)
    w_uk = w_uk.to(x.dtype)
    sync = counters("mla_chain", 3, device)  # [arrivals, generation, the front's writers]
    args = (
        x.contiguous(), w_qa.contiguous(), w_kva.contiguous(), qkv, n1, n2, x.shape[1],
        g_q.contiguous(), eps_q, w_qb.contiguous(), q, nq,
        cos.contiguous(), sin.contiguous(), g_kv.contiguous(), eps_kv, w_uk, storage, length, sync[2:], out, lengths,
        sync, heads, nope, latent, rope // 2, storage.shape[1], w_uk.stride(0), w_uk.stride(1), w_uk.stride(2),
        storage.stride(1),
    )  # fmt: skip
    constants = dict(BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, Q_BLOCK_N=Q_BLOCK_N, FRONT_N=front["BLOCK_N"],
                     FRONT_K=front["BLOCK_K"], BLOCK_R=front["BLOCK_R"], BLOCK_HALF=front["BLOCK_HALF"],
                     INTERLEAVED=interleaved, Q_LINES=triton.next_power_of_2(triton.cdiv(n1, LINE.value)),
                     FRONT_LINES=triton.next_power_of_2(triton.cdiv(front["BLOCK_N"], LINE.value)),
                     NOPE_PAD=triton.next_power_of_2(nope), **launch_options(warps, stages))  # fmt: skip
    if phased:
        for phase in (1, 2, 3):
            _chain_kernel[(programs or 4,)](*args, PHASE=phase, **constants)
    else:
        _chain_kernel[(programs or grid_programs(device),)](*args, PHASE=0, **constants)
    return out, lengths
