"""FP8 layers the DeepSeek-V3 way: E4M3 values, activations scaled per 1x128 tile along the reduction
dimension, weights per 128x128 block, FP32 accumulation promoted every 128 elements of K (the "deepseek"
recipe; "rowwise" scales each row instead, as torchtitan does). The numerics live in `fp8_numerics.py`.

Applied from outside the network, torchtitan-style: `convert_to_fp8_training(model)` turns the attention
projections, dense MLPs, shared experts, MTP projection and routed experts into FP8 layers whose GEMMs
(forward, input gradient, weight gradient) run in FP8 while the master weights and their gradients stay in high
precision; embeddings, the output head, the routers, the norms and the attention core are left alone.
`convert_to_fp8_inference(model)` stores the weights themselves in FP8 with their `weight_scale_inv`, the
layout of DeepSeek's official checkpoints (see `fp8_checkpoint.py`).

Two backends compute the same thing: `EmulatedBackend` (any device) quantises with the reference quantisers and
multiplies the dequantised values in FP32; `fp8_triton.HopperBackend` (CUDA, compute capability 9.0) quantises
with Triton kernels (or, inside `torch.compile`, with torch operations Inductor fuses into their neighbours) and
multiplies with cuBLAS (`torch._scaled_mm`, `torch._scaled_grouped_mm`) or a Triton grouped GEMM. The backend is
chosen, and its capability probes run, when a model is converted: never inside traced code. With the rowwise
recipe the routed experts' whole MLP runs as one autograd function whose kernels write their FP8 operands
(`fp8_moe.py`, `FP8Recipe.fused_moe_quantization`), and the weights can be quantised once per optimizer step
(`fp8_weight_cache.py`, `FP8Recipe.cache_weights`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..kernels import linear_rows, moe_gemv, moe_grouped_gemv
from ..kernels.fp8_blocks import BLOCK, dequantize_blocks, dequantize_experts
from . import fp8_mlp
from .decode_linear import DecodeLinear
from .fp8_moe import FP8RoutedMLPFunction
from .fp8_numerics import (
    FP8,
    OFFICIAL_QUANTIZATION_CONFIG,
    EmulatedBackend,
    ExpertLayout,
    FP8Recipe,
    dequantize_tiles,
    expert_layout,
    grouped_linear_high_precision,
    grouped_weight_grad,
    linear_wgrad_high_precision,
    quantize_blocks,
    quantize_tiles,
)
from .fp8_weight_cache import (
    FP8WeightCopy,
    attach_weight_copies,
    detach_weight_copies,
    refresh_weight_copies,
    weight_copy,
    weight_operands,
)
from .moe import GatherTokenRows, RoutedExperts

_BACKENDS: dict[tuple, object] = {}
_SILU = type(ACT2FN["silu"])  # the activation class of hidden_act "silu" in the installed transformers


def get_backend(recipe: FP8Recipe, device: torch.device):
    """The Hopper backend on CUDA devices of compute capability 9.0+ (unless the recipe asks for emulation).
    Built once per (recipe, kind): call it outside traced code (the conversions do), since building the Hopper
    backend runs its one-time cuBLAS probes."""
    device = torch.device(device)
    use_hopper = (
        recipe.backend != "emulated" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    )
    key = (recipe, use_hopper)
    if key not in _BACKENDS:
        if use_hopper:
            from .fp8_triton import HopperBackend

            _BACKENDS[key] = HopperBackend(recipe, device)
        else:
            _BACKENDS[key] = EmulatedBackend(recipe)
    return _BACKENDS[key]


def _module_backend(module: nn.Module, x: torch.Tensor):
    """The backend chosen at conversion for this module's device; chosen again if the module has moved."""
    backend = getattr(module, "fp8_backend", None)
    if backend is None or (backend.device_type is not None and backend.device_type != x.device.type):
        backend = get_backend(module.fp8_recipe, x.device)
        module.fp8_backend = backend
    return backend


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What an nn.Linear would return here: the autocast dtype inside autocast, else the input's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# --------------------------------------------------------------------------------------------------------------
# Autograd: a linear layer and a group of expert linears with their GEMMs in FP8


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T. Forward: x per 1x128 tile, W per 128x128 block. Input gradient: dy per 1x128 tile along N,
    W^T reusing W's blocks. Weight gradient: dy^T and x^T per 1x128 tile along the tokens. (Rowwise: one scale
    per row of each operand along its reduction dimension: x, dy and W are each quantised in both orientations, each
    orientation with its own amax pass; for W the backend may take W^T's amaxes in the pass over W's rows,
    `quantize_weight_and_amax_t`, which the Triton quantiser does only for the experts' batched weights.)
    `copy`: the layer's `FP8WeightCopy` of W (`FP8Recipe.cache_weights`), whose operands replace W's quantisation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend, out_dtype: torch.dtype, copy=None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        m, n = x2.shape[0], weight.shape[0]
        x_q, x_s = backend.quantize_rows(x2)
        w_q, w_s, wt_amax = weight_operands(backend, weight, ctx.needs_input_grad[0], copy)
        fast = "output" in backend.recipe.fast_accum
        y = backend.gemm(x_q, x_s, w_q, w_s, True, out_dtype, fast)[:m, :n].contiguous()  # a copy only if padded
        if backend.rowwise:  # W^T is quantised afresh from W (and its amaxes): W's FP8 copy need not be kept
            w_q = w_s = None
        ctx.save_for_backward(x2, weight, w_q, w_s, wt_amax)
        ctx.backend, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = backend, x.shape, x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, w_q, w_s, wt_amax = ctx.saved_tensors
        backend, (m, k), n = ctx.backend, x2.shape, dy.shape[-1]
        dy2 = dy.reshape(-1, n)
        dx = dw = None
        wgrad_fp8 = ctx.needs_input_grad[1] and backend.recipe.linear_wgrad == "fp8"
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = backend.quantize_rows(dy2)  # scaled along N, the reduction dimension of dx = dy W
            wt_q, wt_s = backend.quantize_weight_t(weight, w_q, w_s, wt_amax)
            fast = "grad_input" in backend.recipe.fast_accum
            dx = backend.gemm(dy_q, dy_s, wt_q, wt_s, True, ctx.x_dtype, fast)[:m, :k].reshape(ctx.x_shape)
        if ctx.needs_input_grad[1] and not wgrad_fp8:
            dw = linear_wgrad_high_precision(dy2, x2).to(ctx.w_dtype)
        elif ctx.needs_input_grad[1]:
            dyt_q, dyt_s = backend.quantize_rows(dy2.t())  # [N, Mp]: scaled along the tokens
            xt_q, xt_s = backend.quantize_rows(x2.t())  # [K, Mp]
            fast = "grad_weight" in backend.recipe.fast_accum
            dw = backend.gemm(dyt_q, dyt_s, xt_q, xt_s, False, torch.float32, fast)[:n, :k].to(ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe | None = None) -> torch.Tensor:
    """F.linear(x, weight) with the forward and both backward GEMMs in FP8."""
    recipe = recipe or FP8Recipe()
    return FP8LinearFunction.apply(x, weight, get_backend(recipe, x.device), _output_dtype(x), None)


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Per expert e: y[rows of e] = x[rows of e] W[e]^T, with the FP8 scheme of `FP8LinearFunction`; the weight
    gradient of expert e reduces over its own 128-aligned rows only (in FP8, or in bf16 by the recipe's
    `grouped_wgrad`). The layout's tensors are passed one by one, so that Dynamo sees plain tensor inputs."""

    @staticmethod
    def forward(ctx, x_pad, weight, block_expert, seg_start, seg_end, backend, out_dtype, copy=None):
        n = weight.shape[-2]
        layout = ExpertLayout(None, None, None, block_expert, seg_start, seg_end, x_pad.shape[0])
        x_q, x_s = backend.quantize_rows(x_pad)
        w_q, w_s, wt_amax = weight_operands(backend, weight, ctx.needs_input_grad[0], copy)
        fast = "output" in backend.recipe.fast_accum
        y = backend.grouped_gemm(x_q, x_s, w_q, w_s, layout, out_dtype, fast)[:, :n]
        if backend.rowwise:  # W^T is quantised afresh from W (and its amaxes): W's FP8 copy need not be kept
            w_q = w_s = None
        ctx.save_for_backward(x_pad, weight, w_q, w_s, wt_amax, block_expert, seg_start, seg_end)
        ctx.backend, ctx.w_dtype, ctx.x_dtype = backend, weight.dtype, x_pad.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_pad, weight, w_q, w_s, wt_amax, block_expert, seg_start, seg_end = ctx.saved_tensors
        backend = ctx.backend
        layout = ExpertLayout(None, None, None, block_expert, seg_start, seg_end, x_pad.shape[0])
        n, k = dy.shape[1], x_pad.shape[1]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _grouped_input_grad(backend, dy, weight, (w_q, w_s, wt_amax), layout, ctx.x_dtype)[:, :k]
        if ctx.needs_input_grad[1]:
            dw = grouped_weight_grad(backend, dy, x_pad, layout)[:, :n, :k].to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None, None


def _grouped_input_grad(backend, dy, weight, w_quantised, layout: ExpertLayout, dtype) -> torch.Tensor:
    """The experts' input gradient dy W (laid-out rows) in FP8; `w_quantised`: (W's FP8 copy, its scales, W^T's
    amaxes) as the forward kept them."""
    dy_q, dy_s = backend.quantize_rows(dy)
    if backend.deep_gemm:  # the forward's FP8 weight and block scales as they are: no W^T to quantise
        return backend.grouped_gemm_nn(dy_q, dy_s, *w_quantised[:2], layout, dtype)
    wt_q, wt_s = backend.quantize_weight_t(weight, *w_quantised)
    return backend.grouped_gemm(dy_q, dy_s, wt_q, wt_s, layout, dtype, "grad_input" in backend.recipe.fast_accum)


class FP8TokenGroupedLinearFunction(torch.autograd.Function):
    """`FP8GroupedLinearFunction` of the routed experts' first projection, from the token rows x [N, d] themselves
    (`FP8Recipe.quantize_tokens_once`): x is quantised once, a token a row, and its FP8 rows and scales are gathered
    into the 128-aligned layout (row `token_pad[r]` of x, N for a padding row, which is zero), where the bf16 rows
    were gathered k times, laid out and quantised there: the same FP8 operands, a quarter of the bytes moved. Backward
    takes each (token, choice) pair's input gradient from its laid-out row (`pair_rows` [N*k], in token order) and sums
    a token's k of them; the weight gradient lays x out (in its own dtype) only then, or, in the rowwise recipe's FP8,
    reads its rows through `token_pad` (`fp8_numerics.grouped_weight_grad`)."""

    @staticmethod
    def forward(ctx, x, weight, token_pad, pair_rows, block_expert, seg_start, seg_end, backend, out_dtype, copy=None):
        n = weight.shape[-2]
        layout = ExpertLayout(None, None, None, block_expert, seg_start, seg_end, token_pad.shape[0])
        x_q, x_s = backend.gather_rows(*backend.quantize_rows(F.pad(x, (0, 0, 0, 1))), token_pad)  # row N: zeros
        w_q, w_s, wt_amax = weight_operands(backend, weight, ctx.needs_input_grad[0], copy)
        fast = "output" in backend.recipe.fast_accum
        y = backend.grouped_gemm(x_q, x_s, w_q, w_s, layout, out_dtype, fast)[:, :n]
        if backend.rowwise:  # W^T is quantised afresh from W (and its amaxes): W's FP8 copy need not be kept
            w_q = w_s = None
        ctx.save_for_backward(x, weight, w_q, w_s, wt_amax, token_pad, pair_rows, block_expert, seg_start, seg_end)
        ctx.backend, ctx.w_dtype = backend, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, w_q, w_s, wt_amax, token_pad, pair_rows, block_expert, seg_start, seg_end = ctx.saved_tensors
        backend = ctx.backend
        layout = ExpertLayout(None, None, None, block_expert, seg_start, seg_end, token_pad.shape[0])
        (tokens, hidden), n = x.shape, dy.shape[1]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_pad = _grouped_input_grad(backend, dy, weight, (w_q, w_s, wt_amax), layout, x.dtype)[:, :hidden]
            dx = dx_pad.index_select(0, pair_rows).view(tokens, -1, hidden).sum(dim=1)
        if ctx.needs_input_grad[1]:
            dw = grouped_weight_grad(backend, dy, x, layout, x_rows=token_pad)[:, :n, :hidden].to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None, None, None, None


class ScatterUniqueRows(torch.autograd.Function):
    """rows [R, C] -> a zero [total, C] buffer with row i at `pos[i]` (positions unique); its backward, and
    `gather`'s, are the opposite copy: no accumulation, so no atomics.

    Out-of-place `index_copy`, never `index_copy_`: torch 2.11's Dynamo loses the gradient of an autograd.Function
    whose forward returns an in-place result, and the routed experts' input gradient came out zero under
    torch.compile (docs/PERF.md; `benchmarks/fp8_compile_grad_check.py --bisect` keeps the in-place variant)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, pos: torch.Tensor, total: int) -> torch.Tensor:
        ctx.save_for_backward(pos)
        return rows.new_zeros(total, rows.shape[1]).index_copy(0, pos, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pos,) = ctx.saved_tensors
        return grad.index_select(0, pos), None, None

    @staticmethod
    def gather(buffer: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """buffer[pos], with `forward` as its backward."""
        return _GatherUniqueRows.apply(buffer, pos)


class _GatherUniqueRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pos)
        ctx.total = buffer.shape[0]
        return buffer.index_select(0, pos)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pos,) = ctx.saved_tensors
        return grad.new_zeros(ctx.total, grad.shape[1]).index_copy(0, pos, grad), None


# --------------------------------------------------------------------------------------------------------------
# Training modules: same parameters as the modules they replace (their class is swapped in place)


class FP8Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs run in FP8; `weight` stays the master copy."""

    fp8_recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_with_weight(x, self.weight, weight_copy(self, "weight", _module_backend(self, x)))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def linear_with_weight(self, x: torch.Tensor, weight: torch.Tensor, copy: FP8WeightCopy | None = None):
        """x W^T in FP8 by this layer's recipe, for its weight (with `copy`, its FP8 copy, if it keeps one) or for
        another weight W (`joined_projections`: this one's and a sibling's, joined)."""
        return FP8LinearFunction.apply(x, weight, _module_backend(self, x), _output_dtype(x), copy)

    def swiglu_mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`mlp`'s output (this layer being its gate_proj) as one FP8 function (`fp8_mlp.py`), or None where that
        does not serve (`fp8_mlp.serves`)."""
        if not fp8_mlp.serves(mlp):
            return None
        return fp8_mlp.fused_fp8_mlp(mlp, x, _module_backend(self, x), _output_dtype(x))


class FP8RoutedExperts(RoutedExperts):
    """RoutedExperts with both expert GEMMs (and their gradients) in FP8 over a 128-aligned grouped layout."""

    fp8_recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], indices/weights [N, k] -> sum_k weight_k * expert_k(x) [N, d]."""
        backend, dtype = _module_backend(self, x), _output_dtype(x)
        num_tokens, top_k = indices.shape
        layout = expert_layout(indices, self.num_experts)
        # gathers both ways, forward and backward: no scatter-add with atomics (see moe.GatherTokenRows)
        inverse = torch.empty_like(layout.order).scatter_(
            0, layout.order, torch.arange(layout.order.numel(), device=layout.order.device)
        )
        pair_rows = layout.pos[inverse]  # the laid-out row of each (token, choice) pair, in token order
        if self.fp8_recipe.quantize_tokens_once and "gate_up_proj" not in self.fp8_recipe.grouped_bf16:
            token_pad = layout.pos.new_full((layout.rows,), num_tokens)  # row N of x: a padding row (zeros)
            token_pad = token_pad.index_copy(0, layout.pos, layout.token_idx)  # the token of each laid-out row
            tensors = (token_pad, pair_rows, layout.block_expert, layout.seg_start, layout.seg_end)
            copy = weight_copy(self, "gate_up_proj", backend)
            if self._whole_mlp_fused():
                copies = (copy, weight_copy(self, "down_proj", backend))
                return FP8RoutedMLPFunction.apply(
                    x, weights, self.gate_up_proj, self.down_proj, *tensors, backend, dtype, *copies
                )
            gate_up = FP8TokenGroupedLinearFunction.apply(x, self.gate_up_proj, *tensors, backend, dtype, copy)
        else:
            x_sorted = GatherTokenRows.apply(x, layout.order, inverse, top_k)  # [N*k, d] in expert order
            x_pad = ScatterUniqueRows.apply(x_sorted, layout.pos, layout.rows)  # [rows, d], 128-aligned segments
            gate_up = self._project(x_pad, "gate_up_proj", layout, backend, dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        out = self._project(self.act_fn(gate) * up, "down_proj", layout, backend, dtype)
        out = ScatterUniqueRows.gather(out, pair_rows).view(num_tokens, top_k, -1)  # (token, choice) order
        return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(x.dtype)

    def _whole_mlp_fused(self) -> bool:
        """Whether the recipe's `fused_moe_quantization` takes the whole MLP (`fp8_moe.FP8RoutedMLPFunction`): token
        rows quantised once, both projections in FP8 and a SwiGLU activation (and not DeepGEMM's products, whose
        input gradient reads W's blocks as they are: the layer-by-layer path's `grouped_gemm_nn`)."""
        recipe = self.fp8_recipe
        return (
            recipe.fused_moe_quantization
            and recipe.quantize_tokens_once
            and not recipe.grouped_bf16
            and recipe.grouped_gemm != "deep_gemm"
            and type(self.act_fn) is _SILU
        )

    def _project(self, rows: torch.Tensor, name: str, layout: ExpertLayout, backend, dtype) -> torch.Tensor:
        """One projection of every expert over its segment: FP8, or high precision where the recipe keeps it."""
        weight = getattr(self, name)
        if name in self.fp8_recipe.grouped_bf16:
            return grouped_linear_high_precision(rows, weight, layout).to(dtype)
        tensors = (layout.block_expert, layout.seg_start, layout.seg_end)
        copy = weight_copy(self, name, backend)
        return FP8GroupedLinearFunction.apply(rows, weight, *tensors, backend, dtype, copy)


# --------------------------------------------------------------------------------------------------------------
# Inference modules: FP8 weights with their `weight_scale_inv`, the official checkpoint layout


class FP8InferenceLinear(nn.Module):
    """A linear layer stored as DeepSeek ships it: `weight` float8_e4m3fn [out, in], `weight_scale_inv` float32
    [ceil(out/128), ceil(in/128)]; activations are quantised per 1x128 tile on the fly (dynamic scheme), or, for a
    few decode rows on CUDA (`FP8Recipe.weight_only_decode`), kept as they are against the dequantised weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, recipe=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp8_recipe = recipe or FP8Recipe()
        grid = (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), False)
        self.weight_scale_inv = nn.Parameter(torch.ones(grid, dtype=torch.float32, device=device), False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe | None = None, quantize: bool = True):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device, recipe)
        if quantize:
            q, scale = quantize_blocks(linear.weight.detach(), layer.fp8_recipe.pow2_scales)
            layer.weight.data.copy_(q)
            layer.weight_scale_inv.data.copy_(scale)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantized(self, dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear with the exact dequantised weight (each partial block with its own scale)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.weight.device, dtype)
        linear.weight.data.copy_(dequantize_blocks(self.weight, self.weight_scale_inv))
        if self.bias is not None:
            linear.bias.data.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.fp8_recipe.weight_only_decode and moe_gemv.usable_linear_fp8(x2, self.weight):
            y = moe_gemv.linear_gemv_fp8(x2, self.weight, self.weight_scale_inv).reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.fp8_recipe.weight_only_decode and linear_rows.usable_fp8(x2, self.weight):  # more rows: one read of W
            y = linear_rows.linear_rows_fp8(x2, self.weight, self.weight_scale_inv).reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        backend = get_backend(self.fp8_recipe, x.device)
        x_q, x_s = backend.quantize_rows(x2)
        y = backend.gemm(x_q, x_s, self.weight, self.weight_scale_inv, True, _output_dtype(x))[: x2.shape[0]]
        y = y[:, : self.out_features].contiguous().reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks"


class FP8InferenceExperts(RoutedExperts):
    """Routed experts with FP8 weights: `gate_up_proj` [E, 2I, d] and `down_proj` [E, d, I] in e4m3 and their
    block scales, the gate and up grids stacked ([E, 2*ceil(I/128), ceil(d/128)]) since DeepSeek quantises the
    gate and up projections separately. Serialises per expert, as the official checkpoints do."""

    def __init__(self, config, device=None, recipe: FP8Recipe | None = None):
        nn.Module.__init__(self)  # RoutedExperts' own __init__ would allocate full-precision weights
        num_experts, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.act_fn = num_experts, ACT2FN[config.hidden_act]
        self.fp8_recipe = recipe or FP8Recipe()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=FP8, device=device), False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=FP8, device=device), False)
        g_inter, g_hidden = math.ceil(inter / BLOCK), math.ceil(hidden / BLOCK)
        self.gate_up_proj_scale_inv = nn.Parameter(torch.ones(num_experts, 2 * g_inter, g_hidden, device=device), False)
        self.down_proj_scale_inv = nn.Parameter(torch.ones(num_experts, g_hidden, g_inter, device=device), False)

    @classmethod
    def from_experts(cls, experts: RoutedExperts, config, recipe: FP8Recipe | None = None, quantize: bool = True):
        module = cls(config, experts.gate_up_proj.device, recipe)
        module.act_fn = experts.act_fn
        if quantize:
            pow2, inter = module.fp8_recipe.pow2_scales, config.moe_intermediate_size
            gate, up = experts.gate_up_proj.detach().split(inter, dim=1)
            (gate_q, gate_s), (up_q, up_s) = quantize_blocks(gate, pow2), quantize_blocks(up, pow2)
            module.gate_up_proj.data.copy_(torch.cat([gate_q.view(torch.uint8), up_q.view(torch.uint8)], 1).view(FP8))
            module.gate_up_proj_scale_inv.data.copy_(torch.cat([gate_s, up_s], dim=1))
            down_q, down_s = quantize_blocks(experts.down_proj.detach(), pow2)
            module.down_proj.data.copy_(down_q)
            module.down_proj_scale_inv.data.copy_(down_s)
        return module

    @property
    def intermediate_size(self) -> int:
        return self.down_proj.shape[2]

    def dequantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, d], down [E, d, I]) in float32, the gate and up halves with their own grids."""
        return dequantize_experts(*self._fp8_tensors())

    def _fp8_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj, self.down_proj_scale_inv

    def dequantize_(self, dtype: torch.dtype) -> RoutedExperts:
        """Turn this module, in place, into a plain RoutedExperts holding the exact dequantised weights."""
        gate_up, down = self.dequantized_weights()
        del self.gate_up_proj, self.down_proj, self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self.fp8_recipe
        self.gate_up_proj, self.down_proj = nn.Parameter(gate_up.to(dtype)), nn.Parameter(down.to(dtype))
        self.__class__ = RoutedExperts
        return self

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fp8_recipe.weight_only_decode and moe_gemv.usable_fp8(self, x, indices.numel()):
            op = moe_gemv.routed_experts_gemv_fp8
            return moe_gemv.summed_over_top_k(op, x, indices, weights, *self._fp8_tensors())
        if self.fp8_recipe.weight_only_decode and moe_grouped_gemv.usable_fp8(self, x, indices.numel()):
            # beyond MAX_PAIRS: each active expert's FP8 weights read once, not every expert's dequantised
            op = moe_grouped_gemv.routed_experts_grouped_gemv_fp8
            return moe_gemv.summed_over_top_k(op, x, indices, weights, *self._fp8_tensors())
        backend, dtype = get_backend(self.fp8_recipe, x.device), _output_dtype(x)
        layout = expert_layout(indices, self.num_experts)
        if self.intermediate_size % BLOCK:  # the gate and up grids do not tile [2I] evenly: exact dense weights
            gate_up, down = (w.to(dtype) for w in self.dequantized_weights())
            x_sorted, out = x[layout.token_idx].to(dtype), []
            counts = torch.bincount(indices.flatten(), minlength=self.num_experts).tolist()
            for expert, chunk in enumerate(x_sorted.split(counts)):
                gate, up = F.linear(chunk, gate_up[expert]).chunk(2, dim=-1)
                out.append(F.linear(self.act_fn(gate) * up, down[expert]))
            out = torch.cat(out)
        else:
            x_q, x_s = backend.quantize_rows(x)  # quantise each token once, then gather its FP8 rows
            a_q = layout.scatter(x_q[layout.token_idx].view(torch.uint8)).view(FP8)
            a_s = layout.scatter(x_s[layout.token_idx])
            h = backend.grouped_gemm(a_q, a_s, self.gate_up_proj, self.gate_up_proj_scale_inv, layout, dtype)
            gate, up = h[:, : 2 * self.intermediate_size].chunk(2, dim=-1)
            h_q, h_s = backend.quantize_rows(self.act_fn(gate) * up)
            out = backend.grouped_gemm(h_q, h_s, self.down_proj, self.down_proj_scale_inv, layout, dtype)
            out = out[layout.pos, : x.shape[1]]
        out = out * weights.flatten()[layout.order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, layout.token_idx, out.to(x.dtype))

    # Official per-expert keys: `{e}.{gate,up,down}_proj.weight` and `{e}.{gate,up,down}_proj.weight_scale_inv`
    def _expert_views(self) -> dict[str, tuple[torch.Tensor, slice]]:
        inter, g_inter = self.intermediate_size, math.ceil(self.intermediate_size / BLOCK)
        return {
            "gate_proj.weight": (self.gate_up_proj, slice(0, inter)),
            "up_proj.weight": (self.gate_up_proj, slice(inter, 2 * inter)),
            "down_proj.weight": (self.down_proj, slice(None)),
            "gate_proj.weight_scale_inv": (self.gate_up_proj_scale_inv, slice(0, g_inter)),
            "up_proj.weight_scale_inv": (self.gate_up_proj_scale_inv, slice(g_inter, 2 * g_inter)),
            "down_proj.weight_scale_inv": (self.down_proj_scale_inv, slice(None)),
        }

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for expert in range(self.num_experts):
            for name, (tensor, rows) in self._expert_views().items():
                destination[f"{prefix}{expert}.{name}"] = tensor.detach()[expert, rows].clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for expert in range(self.num_experts):
            for name, (tensor, rows) in self._expert_views().items():
                key = f"{prefix}{expert}.{name}"
                if key not in state_dict:
                    missing.append(key)
                    continue
                value, target = state_dict[key], tensor.data[expert, rows]
                if value.shape != target.shape:
                    errors.append(f"size mismatch for {key}: {tuple(value.shape)} vs {tuple(target.shape)}")
                    continue
                target.copy_(value.to(target.device) if value.dtype == target.dtype else value.to(target.dtype))


# --------------------------------------------------------------------------------------------------------------
# Conversions, applied from outside the network


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def convert_to_fp8_training(model: nn.Module, recipe: FP8Recipe | None = None) -> nn.Module:
    """Swap, in place, every nn.Linear (but `recipe.skip`, the output head by default) and every RoutedExperts
    for its FP8 training version. Parameters, optimizer state and hooks are untouched: only the class changes.
    Embeddings, routers, norms and the attention core are not linear layers and stay as they are."""
    recipe = recipe or FP8Recipe()
    for name, module in model.named_modules():
        if recipe.skips(name):
            continue
        if type(module) in (nn.Linear, DecodeLinear):  # DecodeLinear: a decode-only nn.Linear (decode_linear.py)
            module.__class__ = FP8Linear
        elif type(module) is RoutedExperts:
            module.__class__ = FP8RoutedExperts
        else:
            continue
        module.fp8_recipe = recipe
        module.fp8_backend = get_backend(recipe, next(module.parameters()).device)
        if recipe.cache_weights:
            attach_weight_copies(module, ("weight",) if type(module) is FP8Linear else ("gate_up_proj", "down_proj"))
    if recipe.cache_weights and not hasattr(model, "_fp8_copies_hook"):
        model._fp8_copies_hook = model.register_forward_pre_hook(_refresh_weight_copies)
    return model


def _refresh_weight_copies(model: nn.Module, args) -> None:
    """Forward pre-hook of a model converted with `cache_weights`: its layers' stale FP8 weight copies made afresh
    before they run, compiled or not."""
    refresh_weight_copies(model, lambda module, w: get_backend(module.fp8_recipe, w.device))


def convert_from_fp8_training(model: nn.Module) -> nn.Module:
    """Undo `convert_to_fp8_training` in place."""
    for module in model.modules():
        if type(module) is FP8Linear:
            module.__class__ = nn.Linear
        elif type(module) is FP8RoutedExperts:
            module.__class__ = RoutedExperts
        else:
            continue
        del module.fp8_recipe
        module.__dict__.pop("fp8_backend", None)
        detach_weight_copies(module)
    hook = model.__dict__.pop("_fp8_copies_hook", None)
    if hook is not None:
        hook.remove()
    return model


def convert_to_fp8_inference(model: nn.Module, recipe: FP8Recipe | None = None, quantize: bool = True) -> nn.Module:
    """Replace every nn.Linear (but `recipe.skip`) and RoutedExperts by FP8-weight versions, quantised from the
    current weights (`quantize=False` only allocates them, for a loader to fill). The config then carries the
    official `quantization_config`, so `save_pretrained` writes DeepSeek's FP8 checkpoint format."""
    recipe = recipe or FP8Recipe()
    if recipe.rowwise:
        raise ValueError("FP8 inference weights use DeepSeek's 128x128 blocks; the rowwise recipe is for training")
    config = getattr(model, "config", None)
    for name, module in list(model.named_modules()):
        if recipe.skips(name) or not name:
            continue
        if type(module) in (nn.Linear, DecodeLinear, FP8Linear):
            _replace(model, name, FP8InferenceLinear.from_linear(module, recipe, quantize))
        elif type(module) in (RoutedExperts, FP8RoutedExperts):
            _replace(model, name, FP8InferenceExperts.from_experts(module, config, recipe, quantize))
    if config is not None:  # power-of-two scales are DeepSeek-V3.1's `scale_fmt: ue8m0`
        ue8m0 = {"scale_fmt": "ue8m0"} if recipe.pow2_scales else {}
        config.quantization_config = dict(OFFICIAL_QUANTIZATION_CONFIG) | ue8m0
    return model


def dequantize_fp8_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every FP8 inference module by its exact high-precision equivalent and drop the quantization config."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FP8InferenceLinear):
            _replace(model, name, module.dequantized(dtype))
        elif isinstance(module, FP8InferenceExperts):
            module.dequantize_(dtype)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = None
    return model


__all__ = [
    "FP8Recipe",
    "FP8Linear",
    "FP8RoutedExperts",
    "FP8InferenceLinear",
    "FP8InferenceExperts",
    "fp8_linear",
    "quantize_tiles",
    "quantize_blocks",
    "dequantize_tiles",
    "dequantize_blocks",
    "convert_to_fp8_training",
    "convert_from_fp8_training",
    "convert_to_fp8_inference",
    "dequantize_fp8_model",
]
