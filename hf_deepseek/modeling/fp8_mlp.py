"""A dense SwiGLU MLP's whole FP8 chain in one autograd function (`FP8Recipe.fused_mlp_quantization`): the first
layers' dense MLP and the shared experts, while training. As `fp8_moe.FP8RoutedMLPFunction` does for the routed
experts, the SwiGLU writes h in bf16 (kept for the down projection's bf16 weight gradient) and its FP8 rows, and its
gradient writes d(gate, up) in bf16 (for the gate/up weight gradient) and its FP8 rows, where the layer-by-layer path
(`FP8Linear`s, the activation between) has a standalone quantiser read each of them again. Gate and up run as one
GEMM over their joined weights (`joined_projections`). The values are the layer-by-layer path's in eager mode: the
same FP8 operands, bit for bit, and the SwiGLU rounded as torch rounds `F.silu(gate) * up`.
"""

from __future__ import annotations

import torch
from torch import nn

from .fp8_moe import swiglu_backward_quantised, swiglu_quantised
from .fp8_numerics import linear_wgrad_high_precision
from .fp8_weight_cache import weight_operands


class FP8SwiGLUMLPFunction(torch.autograd.Function):
    """down(SwiGLU(x @ w_gate_up^T)) with w_gate_up = [gate; up] [2I, d] and w_down [d, I]: both GEMMs and their
    input gradients in FP8 by the backend's recipe, the weight gradients in bf16."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, backend, out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        m, inter, hidden = x2.shape[0], w_down.shape[1], w_down.shape[0]
        fast = "output" in backend.recipe.fast_accum
        x_q, x_s = backend.quantize_rows(x2)
        wgu_q, wgu_s, wgu_t = weight_operands(backend, w_gate_up, True, None)
        gate_up = backend.gemm(x_q, x_s, wgu_q, wgu_s, True, out_dtype, fast)[:m, : 2 * inter]
        h, h_q, h_s = swiglu_quantised(backend, gate_up)
        wd_q, wd_s, wd_t = weight_operands(backend, w_down, True, None)
        y = backend.gemm(h_q, h_s, wd_q, wd_s, True, out_dtype, fast)[:m, :hidden].contiguous()
        # rowwise: W^T is quantised afresh from W and its amaxes; blockwise: W^T is W's blocks transposed
        blocks = () if backend.rowwise else (wgu_q, wgu_s, wd_q, wd_s)
        ctx.save_for_backward(x2, w_gate_up, w_down, wgu_t, wd_t, gate_up, h, *blocks)
        ctx.backend, ctx.x_shape, ctx.x_dtype = backend, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], hidden)

    @staticmethod
    def backward(ctx, dy):
        x2, w_gate_up, w_down, wgu_t, wd_t, gate_up, h, *blocks = ctx.saved_tensors
        backend = ctx.backend
        wgu_q, wgu_s, wd_q, wd_s = blocks or (None,) * 4
        (m, hidden), inter = x2.shape, h.shape[1]
        fast = "grad_input" in backend.recipe.fast_accum
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy_q, dy_s = backend.quantize_rows(dy2)
        wd_t_q, wd_t_s = backend.quantize_weight_t(w_down, wd_q, wd_s, wd_t)
        d_h = backend.gemm(dy_q, dy_s, wd_t_q, wd_t_s, True, h.dtype, fast)[:m, :inter]
        d_w_down = linear_wgrad_high_precision(dy2, h).to(w_down.dtype) if ctx.needs_input_grad[2] else None
        d_gate_up, dgu_q, dgu_s = swiglu_backward_quantised(backend, d_h, gate_up)
        d_x = d_w_gate_up = None
        if ctx.needs_input_grad[0]:
            wgu_t_q, wgu_t_s = backend.quantize_weight_t(w_gate_up, wgu_q, wgu_s, wgu_t)
            d_x = backend.gemm(dgu_q, dgu_s, wgu_t_q, wgu_t_s, True, ctx.x_dtype, fast)[:m, :hidden]
            d_x = d_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            d_w_gate_up = linear_wgrad_high_precision(d_gate_up, x2).to(w_gate_up.dtype)
        return d_x, d_w_gate_up, d_w_down, None, None


def serves(mlp: nn.Module) -> bool:
    """Whether `FP8SwiGLUMLPFunction` runs `mlp`: FP8 linears of one kind and one recipe with
    `fused_mlp_quantization`, training with gradients, no biases, a SiLU activation, no weight copies
    (`cache_weights`)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    recipe = getattr(gate, "fp8_recipe", None)
    if not (getattr(recipe, "fused_mlp_quantization", False) and gate.training and torch.is_grad_enabled()):
        return False
    if not all(type(p) is type(gate) and p.bias is None and p.fp8_recipe is recipe for p in (gate, up, down)):
        return False
    return not recipe.cache_weights and mlp.act_fn.__class__.__name__ in ("SiLU", "SiLUActivation")


def fused_fp8_mlp(mlp: nn.Module, x: torch.Tensor, backend, out_dtype: torch.dtype) -> torch.Tensor:
    """`mlp`'s output through `FP8SwiGLUMLPFunction` (where `serves(mlp)`), with gate and up joined."""
    w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    return FP8SwiGLUMLPFunction.apply(x, w_gate_up, mlp.down_proj.weight, backend, out_dtype)
