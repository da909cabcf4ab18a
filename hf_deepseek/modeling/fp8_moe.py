"""The routed experts' whole FP8 MLP in one autograd function (`FP8Recipe.fused_moe_quantization`):
token rows gathered by expert -> gate/up GEMM -> SwiGLU -> down GEMM -> weighted sum over each token's experts, and
back. Owning the chain lets the kernels that produce the FP8 GEMMs' row-scaled operands write them too, instead of
each operand being written in bf16 and read again by a standalone quantiser:
- forward, the SwiGLU writes h in bf16 (kept for the down projection's weight gradient) and its FP8 rows;
- backward, the combine's gradient writes each laid-out row's output gradient d_out[token] * weight in bf16 and in
  FP8, and its routing weight's gradient, in one pass over d_out (where autograd wrote the [N, k, d] products, laid
  them out into a zeroed buffer and quantised that);
- backward, the SwiGLU's gradient writes d(gate, up) in bf16 (for the gate/up weight gradient) and its FP8 rows.
The values are those of the layer-by-layer path (`fp8.FP8TokenGroupedLinearFunction`, `FP8GroupedLinearFunction`)
rounded as that path rounds them in eager mode: the SwiGLU and its gradient round silu(gate) and the products
as torch's operations and autograd do; the combine's gradient takes the routing weights in the activations' dtype
and rounds their gradient to it; and each FP8 operand is the rowwise quantisation of the bf16 tensor written beside
it, bit for bit.

On CUDA with Triton (`fp8_moe_triton.py`) each of the three is one kernel for the rowwise recipe; elsewhere (inside a
compile with the recipe's `fused_quantization`, and for the blockwise recipe's 1x128 tiles) the reference below: torch
operations, then the backend's quantiser, which Inductor fuses with them in a compiled step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8_numerics import ExpertLayout, grouped_weight_grad
from .fp8_weight_cache import weight_operands


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 if it is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to dtype, kept in t's."""
    return t.to(dtype).to(t.dtype)


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [R, 2I] = (gate | up), rounded as eager torch rounds `F.silu(gate) * up` in
    gate_up's dtype: silu(gate) computed in float32 or wider and rounded, then the product."""
    gate, up = _wide(gate_up).chunk(2, dim=-1)
    return (_rounded(F.silu(gate), gate_up.dtype) * up).to(gate_up.dtype)


def swiglu_backward_reference(d_h: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d(gate | up) [R, 2I] of `swiglu_reference` given d_h [R, I], rounded as eager autograd rounds it in gate_up's
    dtype: d_up = d_h * silu(gate) (silu rounded as the forward's), d_gate = silu'(gate) * (d_h * up rounded)."""
    dtype = gate_up.dtype
    gate, up = _wide(gate_up).chunk(2, dim=-1)
    d_h = _wide(d_h)
    sig = torch.sigmoid(gate)
    d_gate = _rounded(d_h * up, dtype) * (sig * (1 + gate * (1 - sig)))
    return torch.cat([d_gate, d_h * _rounded(gate * sig, dtype)], dim=-1).to(dtype)


def combine_backward_reference(
    d_out: torch.Tensor, token_pad: torch.Tensor, row_weight: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of out[t] = sum over t's laid-out rows r of row_weight[r] * y[r], as the layer-by-layer path (and
    the bf16 model) computes them, the weight taken in d_out's dtype: d_y [R, d] = d_out[token_pad[r]] * row_weight[r]
    rounded to d_out's dtype (zero where token_pad is N, a padding row), and d_row_weight [R] = <d_out[t], y[r]>,
    each product rounded to d_out's dtype, summed in float32 or wider, rounded to d_out's dtype (zero for padding
    rows, whatever y holds there), returned in float32 or wider."""
    d_pad = _wide(F.pad(d_out, (0, 0, 0, 1)).index_select(0, token_pad))  # row N: zeros
    valid = token_pad < d_out.shape[0]
    d_y = (d_pad * _wide(row_weight.to(d_out.dtype))[:, None]).to(d_out.dtype)
    y_rows = _wide(y[: token_pad.shape[0]])
    products = _rounded(d_pad * torch.where(valid[:, None], y_rows, 0.0), d_out.dtype)
    d_row_weight = torch.where(valid, products.sum(dim=-1), 0.0)
    return d_y, _wide(d_row_weight.to(d_out.dtype))


def _triton_serves(backend, t: torch.Tensor) -> bool:
    """Whether the Triton kernels run: the Hopper backend's rowwise recipe, outside Inductor's fused quantisation (the
    blockwise recipe's 1x128 tiles take the reference, which Inductor fuses where the step is compiled)."""
    return backend.name == "hopper" and backend.rowwise and t.is_cuda and not backend._fused()


def swiglu_quantised(backend, gate_up: torch.Tensor):
    """h = SwiGLU(gate_up) [R, I] and its FP8 rows (q, scales) as `backend.quantize_rows(h)` gives them."""
    if _triton_serves(backend, gate_up):
        from .fp8_moe_triton import swiglu_rows_triton

        return swiglu_rows_triton(gate_up, backend.pow2)
    h = swiglu_reference(gate_up)
    return (h, *backend.quantize_rows(h))


def swiglu_backward_quantised(backend, d_h: torch.Tensor, gate_up: torch.Tensor):
    """d(gate | up) [R, 2I] and its FP8 rows, as `backend.quantize_rows` gives them."""
    if _triton_serves(backend, gate_up):
        from .fp8_moe_triton import swiglu_backward_rows_triton

        return swiglu_backward_rows_triton(d_h, gate_up, backend.pow2)
    d_gate_up = swiglu_backward_reference(d_h, gate_up)
    return (d_gate_up, *backend.quantize_rows(d_gate_up))


def combine_backward_quantised(backend, d_out, token_pad, row_weight, y):
    """`combine_backward_reference`'s d_y with its FP8 rows, and d_row_weight: (d_y, q, scales, d_row_weight)."""
    if _triton_serves(backend, d_out):
        from .fp8_moe_triton import combine_backward_rows_triton

        return combine_backward_rows_triton(d_out, token_pad, row_weight, y, backend.pow2)
    d_y, d_row_weight = combine_backward_reference(d_out, token_pad, row_weight, y)
    return (d_y, *backend.quantize_rows(d_y), d_row_weight)


class FP8RoutedMLPFunction(torch.autograd.Function):
    """out [N, d] = sum over k of weights[:, k] * down(SwiGLU(gate_up(x)))[laid-out row of (token, k)], both expert
    GEMMs and their input gradients in FP8 (by the backend's recipe), the weight gradients in its `grouped_wgrad`
    precision (`fp8_numerics.grouped_weight_grad`). `token_pad` [rows]: the token of each laid-out row (N for
    padding rows); `pair_rows` [N*k]: the laid-out row of each (token, choice) pair, in token order;
    `gate_up_copy`, `down_copy`: the layer's `FP8WeightCopy`s, or None. The layout's tensors are passed one by one,
    so that Dynamo sees plain tensor inputs."""

    @staticmethod
    def forward(ctx, x, weights, w_gate_up, w_down, token_pad, pair_rows, block_expert, seg_start, seg_end, backend,
                out_dtype, gate_up_copy, down_copy):  # fmt: skip
        (tokens, hidden), top_k = x.shape, weights.shape[1]
        layout = ExpertLayout(None, None, None, block_expert, seg_start, seg_end, token_pad.shape[0])
        fast = "output" in backend.recipe.fast_accum
        x_q, x_s = backend.gather_rows(*backend.quantize_rows(F.pad(x, (0, 0, 0, 1))), token_pad)  # row N: zeros
        # W's FP8 rows and, from the same read, the amaxes of W^T's rows that the input gradient quantises it with
        # (blockwise: W's blocks; or the layer's copy of them, W^T's blocks too, made once per optimizer step:
        # `FP8Recipe.cache_weights`)
        wgu_q, wgu_s, wgu_t = weight_operands(backend, w_gate_up, True, gate_up_copy)
        gate_up = backend.grouped_gemm(x_q, x_s, wgu_q, wgu_s, layout, out_dtype, fast)[:, : w_gate_up.shape[-2]]
        h, h_q, h_s = swiglu_quantised(backend, gate_up)
        wd_q, wd_s, wd_t = weight_operands(backend, w_down, True, down_copy)
        y = backend.grouped_gemm(h_q, h_s, wd_q, wd_s, layout, out_dtype, fast)[:, :hidden]
        out = (y.index_select(0, pair_rows).view(tokens, top_k, hidden) * weights[..., None].to(y.dtype)).sum(dim=1)
        # rowwise: W^T requantised from W (and its column amaxes), W's FP8 rows not kept; blockwise: W^T is W's blocks
        # transposed (or the copy's W^T), so they are kept
        blocks = () if backend.rowwise else (wgu_q, wgu_s, wd_q, wd_s)
        ctx.save_for_backward(x, weights, w_gate_up, w_down, wgu_t, wd_t, gate_up, h, y, token_pad, pair_rows,
                              block_expert, seg_start, seg_end, *blocks)  # fmt: skip
        ctx.backend = backend
        # not `out.to(x.dtype)` where the dtypes agree: that returns `out` itself, and torch 2.11's Dynamo cuts such
        # an output from the autograd graph (every gradient through this function came out zero when compiled)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, d_out):
        (x, weights, w_gate_up, w_down, wgu_t, wd_t, gate_up, h, y, token_pad, pair_rows, block_expert, seg_start,
         seg_end, *blocks) = ctx.saved_tensors  # fmt: skip
        backend = ctx.backend
        wgu_q, wgu_s, wd_q, wd_s = blocks or (None,) * 4
        (tokens, hidden), top_k, inter = x.shape, weights.shape[1], h.shape[1]
        layout = ExpertLayout(None, None, None, block_expert, seg_start, seg_end, token_pad.shape[0])
        fast = "grad_input" in backend.recipe.fast_accum
        row_weight = weights.new_zeros(token_pad.shape[0]).index_copy(0, pair_rows, weights.flatten())
        d_y, d_y_q, d_y_s, d_row_weight = combine_backward_quantised(
            backend, d_out.contiguous(), token_pad, row_weight.float(), y
        )
        wd_t_q, wd_t_s = backend.quantize_weight_t(w_down, wd_q, wd_s, wd_t)
        d_h = backend.grouped_gemm(d_y_q, d_y_s, wd_t_q, wd_t_s, layout, h.dtype, fast)[:, :inter]
        d_w_down = None
        if ctx.needs_input_grad[3]:
            d_w_down = grouped_weight_grad(backend, d_y, h, layout)[:, :hidden, :inter]
            d_w_down = d_w_down.to(w_down.dtype)
        d_gate_up, dgu_q, dgu_s = swiglu_backward_quantised(backend, d_h, gate_up)
        d_x = d_w_gate_up = None
        if ctx.needs_input_grad[0]:
            wgu_t_q, wgu_t_s = backend.quantize_weight_t(w_gate_up, wgu_q, wgu_s, wgu_t)
            d_x_pad = backend.grouped_gemm(dgu_q, dgu_s, wgu_t_q, wgu_t_s, layout, x.dtype, fast)[:, :hidden]
            d_x = d_x_pad.index_select(0, pair_rows).view(tokens, top_k, hidden).sum(dim=1)
        if ctx.needs_input_grad[2]:
            d_w_gate_up = grouped_weight_grad(backend, d_gate_up, x, layout, x_rows=token_pad)
            d_w_gate_up = d_w_gate_up[:, : w_gate_up.shape[-2], :hidden].to(w_gate_up.dtype)
        d_weights = d_row_weight.index_select(0, pair_rows).view(tokens, top_k).to(weights.dtype)
        return d_x, d_weights, d_w_gate_up, d_w_down, None, None, None, None, None, None, None, None, None
