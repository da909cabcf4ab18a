"""The Triton kernels of `moe_gemv.py` (imported only where Triton and CUDA exist). With `SCALED` the weights are
FP8 with DeepSeek's 128x128 block scales (`weight_scale_inv`), dequantised in registers: half the bytes read."""

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K, WARPS = 32, 256, 4


@triton.jit
def _gate_up_kernel(
    x_ptr, idx_ptr, w_ptr, s_ptr, act_ptr, D, INTER, TOP_K, G_INTER, G_D,
    SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """act[p, n] = SiLU(gate[e_p, n] . x[t_p]) * (up[e_p, n] . x[t_p]) for a block of n; gate rows [0, I), up rows
    [I, 2I) of the expert's [2I, d] matrix. SCALED: gate scales [G_INTER, G_D], then up's, per expert."""
    pair = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    token = pair // TOP_K
    expert = tl.load(idx_ptr + pair).to(tl.int64)
    w = w_ptr + expert * (2 * INTER) * D
    n_ok = n < INTER
    acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        xk = tl.load(x_ptr + token * D + k, mask=k_ok, other=0.0).to(tl.float32)
        mask = n_ok[:, None] & k_ok[None, :]
        gate = tl.load(w + n[:, None] * D + k[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(w + (n[:, None] + INTER) * D + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if SCALED:  # the block's rows lie in one 128-row block of scales (launch checks 128 % BLOCK_N == 0)
            s = s_ptr + expert * (2 * G_INTER) * G_D + (n0 // 128) * G_D + k // 128
            gate *= tl.load(s, mask=k_ok, other=0.0)[None, :]
            up *= tl.load(s + G_INTER * G_D, mask=k_ok, other=0.0)[None, :]
        acc_gate += tl.sum(gate * xk[None, :], axis=1)
        acc_up += tl.sum(up * xk[None, :], axis=1)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(act_ptr + pair * INTER + n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_kernel(
    act_ptr, idx_ptr, weight_ptr, w_ptr, s_ptr, out_ptr, D, INTER, G_INTER, G_D,
    SCALED: tl.constexpr, ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[p, n] = routing_weight[p] * (down[e_p, n] . act[p]) in fp32, for a block of n. SCALED: scales
    [G_D, G_INTER] per expert. Not ROUTED: one matrix and no routing weights (idx and weight pointers unread), each
    row of act a plain matrix-vector product (an FP8 linear layer)."""
    pair = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    expert = 0
    if ROUTED:
        expert = tl.load(idx_ptr + pair).to(tl.int64)
    w = w_ptr + expert * D * INTER
    n_ok = n < D
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < INTER
        mask = n_ok[:, None] & k_ok[None, :]
        a = tl.load(act_ptr + pair * INTER + k, mask=k_ok, other=0.0).to(tl.float32)
        down = tl.load(w + n[:, None] * INTER + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if SCALED:
            s = s_ptr + expert * G_D * G_INTER + (n0 // 128) * G_INTER + k // 128
            down *= tl.load(s, mask=k_ok, other=0.0)[None, :]
        acc += tl.sum(down * a[None, :], axis=1)
    if ROUTED:
        acc *= tl.load(weight_ptr + pair).to(tl.float32)
    tl.store(out_ptr + pair * D + n, acc, mask=n_ok)


def launch(x, indices, weights, gate_up, down, config=None, gate_up_scale=None, down_scale=None) -> torch.Tensor:
    """`config`: (BLOCK_N, BLOCK_K, warps) for both kernels (the tuning script tries several). With the two
    scales, gate_up and down are FP8 weights with their block scales; the activation is kept in x's dtype."""
    block_n, block_k, warps = config or (BLOCK_N, BLOCK_K, WARPS)
    num_tokens, top_k = indices.shape
    pairs, dim, inter = num_tokens * top_k, x.shape[-1], down.shape[-1]
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    flat_idx, flat_w = indices.reshape(-1).contiguous(), weights.reshape(-1).contiguous()
    scaled = gate_up_scale is not None
    if scaled:
        _check_scaled_block(block_n)
        gate_up_scale, down_scale = gate_up_scale.float().contiguous(), down_scale.float().contiguous()
    g_inter, g_dim = triton.cdiv(inter, 128), triton.cdiv(dim, 128)
    act = torch.empty(pairs, inter, device=x.device, dtype=x.dtype if scaled else gate_up.dtype)
    _gate_up_kernel[(pairs, triton.cdiv(inter, block_n))](
        x, flat_idx, gate_up, gate_up_scale if scaled else gate_up, act, dim, inter, top_k, g_inter, g_dim,
        SCALED=scaled, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    out = torch.empty(pairs, dim, device=x.device, dtype=torch.float32)
    _down_kernel[(pairs, triton.cdiv(dim, block_n))](
        act, flat_idx, flat_w, down, down_scale if scaled else down, out, dim, inter, g_inter, g_dim,
        SCALED=scaled, ROUTED=True, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return out.view(num_tokens, top_k, dim).sum(dim=1).to(x.dtype)


def _check_scaled_block(block_n: int) -> None:
    if 128 % block_n:
        raise ValueError(f"FP8 weights need BLOCK_N dividing the 128-row scale blocks, got {block_n}")


def launch_linear_fp8(x, weight, scale, config=None) -> torch.Tensor:
    """x [T, K] @ dequantised(weight [N, K] FP8, scale [ceil(N/128), ceil(K/128)])^T -> [T, N] in x's dtype: the
    down kernel over one matrix, each row a matrix-vector product."""
    block_n, block_k, warps = config or (BLOCK_N, BLOCK_K, WARPS)
    _check_scaled_block(block_n)
    rows, (n, k) = x.shape[0], weight.shape
    x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=torch.float32)
    _down_kernel[(rows, triton.cdiv(n, block_n))](
        x, x, x, weight.contiguous(), scale.float().contiguous(), out, n, k, triton.cdiv(k, 128), triton.cdiv(n, 128),
        SCALED=True, ROUTED=False, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return out.to(x.dtype)
