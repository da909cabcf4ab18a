"""The Triton kernels of `moe_grouped_gemv.py` (imported only where Triton and CUDA exist): the routed experts of a
decode batch with every active expert's weights read once, for all of its token-expert pairs.

The pairs are sorted by expert on the device by one small kernel (`sort_pairs`: `moe_routing.sort_pairs`'s result,
no host read, static shapes; torch's stable argsort alone took 27 us a layer at batch 32 on an H200). A program
owns (expert e, block of BLOCK_N weight rows); the grid is (E, rows / BLOCK_N) whatever the routing, so a CUDA graph
replays it, and the programs of an expert without pairs find an empty range and read nothing. A program takes its
expert's pairs BLOCK_T at a time and, per K step, loads the weight tile once and applies it to the chunk's BLOCK_T
token rows: with BLOCK_T >= 16 as a tensor-core `tl.dot` (the weight tile is the B operand; unused rows of the chunk
are masked to zero and cost no bandwidth), with fewer as a broadcast multiply and sum on the CUDA cores. A second
chunk (an expert with more than BLOCK_T pairs) streams the tiles again, mostly from L2.

Kernel 1 writes SiLU(gate) * up per pair to act [P, I] in the sorted order (in the activation's dtype, as
`_moe_gemv_triton` stores it); kernel 2 does the down projection of the same rows, scales each by its routing weight
and writes fp32 [P, d] back in the (token, choice) order, which torch sums over the top-k (deterministic: no atomics).

FP8 weights (`SCALED`, e4m3 with DeepSeek's 128x128 `weight_scale_inv` blocks): BLOCK_N and BLOCK_K divide 128, so a
step's weight tile lies in one block; its values are converted exactly to the activation's dtype (bf16 and fp16
hold every e4m3 value), multiplied against the token rows with fp32 accumulation, and the step's partial sums times
the block's scale are added to the fp32 accumulator: the products of `_moe_gemv_triton`'s in-register dequantisation
(q * s, then * x), up to the order of the fp32 additions."""

import torch
import triton
import triton.language as tl

from .moe_gemv_config import grouped_config, launch_options


@triton.jit
def _sort_pairs_kernel(flat_ptr, order_ptr, offsets_ptr, P, E, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_E: tl.constexpr):  # fmt: skip
    """A counting sort by comparison, for the few hundred pairs of a decode step: pair p (expert e_p) goes to
    #{q: e_q < e_p} + #{q < p: e_q == e_p} (stable); program 0 also writes offsets[e] = #{q: e_q < e} for e <= E."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    e_p = tl.load(flat_ptr + p, mask=p_ok, other=0).to(tl.int32)
    position = tl.zeros([BLOCK_P], dtype=tl.int32)
    for q0 in range(0, P, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = q < P
        e_q = tl.load(flat_ptr + q, mask=q_ok, other=0).to(tl.int32)
        before = (e_q[None, :] < e_p[:, None]) | ((e_q[None, :] == e_p[:, None]) & (q[None, :] < p[:, None]))
        position += tl.sum((before & q_ok[None, :]).to(tl.int32), axis=1)
    tl.store(order_ptr + position, p, mask=p_ok)
    if tl.program_id(0) == 0:
        for e0 in range(0, E + 1, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            below = tl.zeros([BLOCK_E], dtype=tl.int32)
            for q0 in range(0, P, BLOCK_Q):
                q = q0 + tl.arange(0, BLOCK_Q)
                q_ok = q < P
                e_q = tl.load(flat_ptr + q, mask=q_ok, other=0).to(tl.int32)
                below += tl.sum(((e_q[None, :] < e[:, None]) & q_ok[None, :]).to(tl.int32), axis=1)
            tl.store(offsets_ptr + e, below, mask=e <= E)


def sort_pairs(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_routing.sort_pairs` in one launch: indices [N, k] -> (order [N*k] int32, offsets [E+1] int32)."""
    flat = indices.reshape(-1).contiguous()
    pairs = flat.numel()
    order = torch.empty(pairs, device=flat.device, dtype=torch.int32)
    offsets = torch.empty(num_experts + 1, device=flat.device, dtype=torch.int32)
    block_p = min(128, triton.next_power_of_2(max(pairs, 16)))
    _sort_pairs_kernel[(triton.cdiv(pairs, block_p),)](
        flat, order, offsets, pairs, num_experts, BLOCK_P=block_p, BLOCK_Q=64, BLOCK_E=64, num_warps=4
    )
    return order, offsets


@triton.jit
def _tile_product(a, w, scale_ptr, SCALED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a [BLOCK_T, BLOCK_K] . w [BLOCK_N, BLOCK_K]^T -> fp32 [BLOCK_T, BLOCK_N], w converted to a's dtype (SCALED:
    from e4m3, exactly, then the product times the tile's one block scale at scale_ptr). DOT: on the tensor cores
    (PRECISION "ieee" keeps fp32 operands fp32, not TF32; None: tl.dot's default); else broadcast, multiply and sum
    over K."""
    if SCALED:
        w = w.to(tl.float32)
    w = w.to(a.dtype)
    if DOT:
        out = tl.dot(a, tl.trans(w), input_precision=PRECISION)
    else:
        out = tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SCALED:
        out *= tl.load(scale_ptr)
    return out


@triton.jit
def _program_block(offsets_ptr, ROWS, BLOCK_N: tl.constexpr):
    """This program's expert (program_id(0)), the range [start, end) of its sorted pairs, and its block of BLOCK_N
    weight rows (program_id(1)) of ROWS with their mask."""
    expert = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    return expert, tl.load(offsets_ptr + expert), tl.load(offsets_ptr + expert + 1), n0, n, n < ROWS


@triton.jit
def _grouped_gate_up_kernel(
    x_ptr, order_ptr, offsets_ptr, w_ptr, s_ptr, act_ptr, D, INTER, TOP_K, G_INTER, G_D,
    SCALED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """act[r, n] = SiLU(gate[e, n] . x[t_r]) * (up[e, n] . x[t_r]) for the sorted pairs r of expert e =
    program_id(0) (order[r] // TOP_K is the token t_r) and a block of n; gate rows [0, I), up rows [I, 2I) of the
    expert's [2I, d] matrix. SCALED: gate scales [G_INTER, G_D], then up's, per expert."""
    expert, start, end, n0, n, n_ok = _program_block(offsets_ptr, INTER, BLOCK_N)
    w = w_ptr + expert.to(tl.int64) * (2 * INTER) * D
    s = s_ptr + expert * (2 * G_INTER) * G_D + (n0 // 128) * G_D  # the rows' block of scales (SCALED)
    for t0 in range(start, end, BLOCK_T):  # no pairs: no iteration, nothing read
        r = t0 + tl.arange(0, BLOCK_T)
        r_ok = r < end
        token = tl.load(order_ptr + r, mask=r_ok, other=0).to(tl.int64) // TOP_K
        acc_gate = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, D, BLOCK_K, num_stages=STAGES):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D
            xk = tl.load(x_ptr + token[:, None] * D + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            mask = n_ok[:, None] & k_ok[None, :]
            gate = tl.load(w + n[:, None] * D + k[None, :], mask=mask, other=0.0)
            up = tl.load(w + (n[:, None] + INTER) * D + k[None, :], mask=mask, other=0.0)
            acc_gate += _tile_product(xk, gate, s + k0 // 128, SCALED, BLOCK_T >= 16, PRECISION)
            acc_up += _tile_product(xk, up, s + G_INTER * G_D + k0 // 128, SCALED, BLOCK_T >= 16, PRECISION)
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        out = act_ptr + r[:, None] * INTER + n[None, :]
        tl.store(out, act.to(act_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_down_kernel(
    act_ptr, order_ptr, offsets_ptr, weight_ptr, w_ptr, s_ptr, out_ptr, D, INTER, G_INTER, G_D,
    SCALED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[order[r], n] = routing_weight[order[r]] * (down[e, n] . act[r]) in fp32 for the sorted pairs r of expert
    e = program_id(0) and a block of n (out in the (token, choice) order). SCALED: scales [G_D, G_INTER] per
    expert."""
    expert, start, end, n0, n, n_ok = _program_block(offsets_ptr, D, BLOCK_N)
    w = w_ptr + expert.to(tl.int64) * D * INTER
    s = s_ptr + expert * G_D * G_INTER + (n0 // 128) * G_INTER
    for t0 in range(start, end, BLOCK_T):
        r = t0 + tl.arange(0, BLOCK_T)
        r_ok = r < end
        pair = tl.load(order_ptr + r, mask=r_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, INTER, BLOCK_K, num_stages=STAGES):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < INTER
            a = tl.load(act_ptr + r[:, None] * INTER + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            down = tl.load(w + n[:, None] * INTER + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += _tile_product(a, down, s + k0 // 128, SCALED, BLOCK_T >= 16, PRECISION)
        acc *= tl.load(weight_ptr + pair, mask=r_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + pair[:, None] * D + n[None, :], acc, mask=r_ok[:, None] & n_ok[None, :])


def launch(
    x, indices, weights, gate_up, down, config=None, gate_up_scale=None, down_scale=None, per_pair: bool = False
) -> torch.Tensor:
    """x [N, d], indices/weights [N, k], gate_up [E, 2I, d], down [E, d, I] -> [N, d] in x's dtype (`per_pair`: the
    pairs' fp32 products [N, k, d], unsummed). `config`: a `moe_gemv_config.GroupedConfig` or tuple (BLOCK_T,
    BLOCK_N, BLOCK_K, WARPS[, STAGES]), by default `GROUPED_CONFIG` (`GROUPED_FP8_CONFIG` for FP8). With the two
    scales, gate_up and down are FP8 weights with their 128x128 block scales and the activation is kept in x's dtype
    (else in the weights')."""
    scaled = gate_up_scale is not None
    block_t, block_n, block_k, warps, stages = grouped_config(config, fp8=scaled)
    num_tokens, top_k = indices.shape
    num_experts, dim, inter = gate_up.shape[0], x.shape[-1], down.shape[-1]
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    order, offsets = sort_pairs(indices, num_experts)
    flat_w = weights.reshape(-1).contiguous()
    if scaled:
        gate_up_scale, down_scale = gate_up_scale.float().contiguous(), down_scale.float().contiguous()
    act_dtype = x.dtype if scaled else gate_up.dtype
    act = torch.empty(order.numel(), inter, device=x.device, dtype=act_dtype)
    out = torch.empty(order.numel(), dim, device=x.device, dtype=torch.float32)
    g_inter, g_dim = triton.cdiv(inter, 128), triton.cdiv(dim, 128)
    opts = dict(SCALED=scaled, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                PRECISION="ieee" if x.dtype == torch.float32 else None, **launch_options(warps, stages))  # fmt: skip
    _grouped_gate_up_kernel[(num_experts, triton.cdiv(inter, block_n))](
        x, order, offsets, gate_up, gate_up_scale if scaled else gate_up, act, dim, inter, top_k, g_inter, g_dim,
        **opts,
    )  # fmt: skip
    _grouped_down_kernel[(num_experts, triton.cdiv(dim, block_n))](
        act, order, offsets, flat_w, down, down_scale if scaled else down, out, dim, inter, g_inter, g_dim, **opts
    )
    out = out.view(num_tokens, top_k, dim)
    return out if per_pair else out.sum(dim=1).to(x.dtype)
