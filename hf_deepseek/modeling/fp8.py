"""Block-scaled FP8 the DeepSeek-V3 way: E4M3 values, activations scaled per 1x128 tile along the reduction
dimension, weights per 128x128 block, FP32 accumulation promoted every 128 elements of K.

Applied from outside the network, torchtitan-style: `convert_to_fp8_training(model)` turns the attention
projections, dense MLPs, shared experts, MTP projection and routed experts into FP8 layers whose three GEMMs
(forward, input gradient, weight gradient) run in FP8 while the master weights and their gradients stay in high
precision; embeddings, the output head, the routers, the norms and the attention core are left alone.
`convert_to_fp8_inference(model)` stores the weights themselves in FP8 with their `weight_scale_inv`, the
layout of DeepSeek's official checkpoints (see `fp8_checkpoint.py`).

Two backends compute the same thing: `EmulatedBackend` (any device) quantises with the reference quantisers
below and multiplies the dequantised values in FP32; `fp8_triton.HopperBackend` (CUDA, compute capability 9.0)
quantises with Triton kernels that reproduce the reference bit for bit and multiplies with `torch._scaled_mm`'s
blockwise cuBLAS path or a Triton grouped GEMM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .moe import RoutedExperts, count_per_expert

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128  # tile length (activations) and block side (weights)
AMAX_FLOOR = 1e-12  # an all-zero tile still gets a finite, non-zero scale; gradients' tiles often peak below 1e-6
FP8 = torch.float8_e4m3fn
OFFICIAL_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}


@dataclass(frozen=True)
class FP8Recipe:
    """How FP8 layers quantise and which kernels they use.

    `pow2_scales`: round every scale up to a power of two (UE8M0, as DeepSeek-V3.1 and DeepGEMM do);
    `backend`: "auto" (Hopper kernels on a CUDA device of compute capability 9.0+, else emulation) or "emulated";
    `gemm`: for the Hopper backend, "auto" (cuBLAS blockwise where it dispatches, else Triton), "cublas" or
    "triton"; `check_finite`: raise on NaN/inf inputs; None (default) checks where it is free (the emulation) and
    lets them propagate on the GPU, where a check costs a device sync per quantisation (NaN scales then make the
    output, and the loss, NaN);
    `skip`: names of modules (matched against the end of their qualified name) left in high precision.
    """

    pow2_scales: bool = False
    backend: str = "auto"
    gemm: str = "auto"
    check_finite: bool | None = None
    skip: tuple[str, ...] = field(default=("lm_head",))

    def skips(self, name: str) -> bool:
        """Whether the module with this qualified name stays in high precision."""
        return any(name == s or name.endswith("." + s) for s in self.skip)


# --------------------------------------------------------------------------------------------------------------
# Reference quantisers (the emulation backend uses them; the Triton kernels reproduce them bit for bit)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (positive normal floats), exactly, by editing the float32 bits."""
    bits = scale.view(torch.int32)
    exponent = bits & 0x7F800000
    return torch.where(bits & 0x007FFFFF != 0, exponent + 0x00800000, exponent).view(torch.float32)


def scales_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """Dequantisation scale (`scale_inv` in DeepSeek's names) of each tile or block: max(amax, 1e-12) / 448."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    scale = amax / torch.full_like(amax, E4M3_MAX)  # a true division: torch on CUDA multiplies by 1/448 for a scalar
    return _pow2_ceil(scale) if pow2 else scale


def check_finite(amax: torch.Tensor, what: str) -> None:
    """NaN or inf anywhere in a tile shows up in its amax (torch's max propagates NaN)."""
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"FP8 quantisation of {what} got NaN or inf values; refusing to encode them as E4M3.")


def _encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, rounded to nearest-even E4M3 (|x / scale| <= 448 by construction; the clamp absorbs rounding)."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_tiles(x: torch.Tensor, pow2: bool = False, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles along the last dimension: x [..., K] -> (q [..., Kp] e4m3, scale [..., Kp/128] fp32).

    K is zero-padded to Kp, the next multiple of 128 (zeros change no tile's amax), so q can feed a GEMM;
    x == dequantize_tiles(q, scale)[..., :K] up to E4M3 rounding.
    """
    k = x.shape[-1]
    tiles = F.pad(x.float(), (0, _ceil_to(k, BLOCK) - k)).unflatten(-1, (-1, BLOCK))  # [..., Kp/128, 128]
    amax = tiles.abs().amax(dim=-1)
    if check:
        check_finite(amax, "a 1x128 activation tile")
    scale = scales_from_amax(amax, pow2)
    return _encode(tiles, scale[..., None]).flatten(-2), scale


def quantize_blocks(w: torch.Tensor, pow2: bool = False, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks: w [..., N, K] -> (q [..., N, K] e4m3, scale [..., ceil(N/128), ceil(K/128)] fp32).

    As in DeepSeek's checkpoints, a dimension that is not a multiple of 128 ends in a partial block that gets
    its own scale (the amax of the elements it has); q keeps w's shape.
    """
    n, k = w.shape[-2:]
    padded = F.pad(w.float(), (0, _ceil_to(k, BLOCK) - k, 0, _ceil_to(n, BLOCK) - n))
    blocks = padded.unflatten(-1, (-1, BLOCK)).unflatten(-3, (-1, BLOCK))  # [..., Nb, 128, Kb, 128]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., Nb, Kb]
    if check:
        check_finite(amax, "a 128x128 weight block")
    scale = scales_from_amax(amax, pow2)
    q = _encode(blocks, scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    return q[..., :n, :k], scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_tiles` in float32: q [..., K] * scale of its 1x128 tile."""
    return q.float() * scale.float().repeat_interleave(BLOCK, dim=-1)[..., : q.shape[-1]]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_blocks` in float32, each element times the scale of its (possibly partial) block.

    The block size is 128, never derived from the scale grid: a [576, 7168] weight has a [5, 56] grid whose
    last row of blocks holds 64 rows, and a [136, 160] weight a [2, 2] grid of 128+8 by 128+32.
    """
    n, k = q.shape[-2:]
    expected = (math.ceil(n / BLOCK), math.ceil(k / BLOCK))
    if tuple(scale.shape[-2:]) != expected:
        raise ValueError(f"A [{n}, {k}] weight needs a {list(expected)} scale grid, got {list(scale.shape[-2:])}.")
    full = scale.float().repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return q.float() * full[..., :n, :k]


# --------------------------------------------------------------------------------------------------------------
# Backends: the operations the FP8 layers need. Layout conventions shared by both backends:
#   quantize_rows(x [R, C]) -> q [Rp, Cp], scale [Rp, Cp/128]: 1x128 tiles along C, zero rows/cols as padding;
#   quantize_weight(w [..., N, K]) -> q [..., N', K'], scale [..., ceil(N/128), ceil(K/128)], q^T or None;
#   gemm(a, a_scale, b, b_scale, b_blocks) -> a @ b^T [Ma, Nb]: both operands K-contiguous, a per 1x128 tile,
#       b per 128x128 block (`b_blocks`) or per 1x128 tile; b may hold fewer K columns than a's zero padding.


class EmulatedBackend:
    """Reference numerics on any device: the reference quantisers, then FP32 products of dequantised values."""

    name = "emulated"

    def __init__(self, recipe: FP8Recipe):
        self.pow2, self.check = recipe.pow2_scales, recipe.check_finite is not False

    def quantize_rows(self, x: torch.Tensor, rows_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = quantize_tiles(x, self.pow2, self.check)
        pad = _ceil_to(x.shape[0], rows_multiple) - x.shape[0]
        return F.pad(q.view(torch.uint8), (0, 0, 0, pad)).view(FP8), F.pad(scale, (0, 0, 0, pad))

    def quantize_weight(self, w: torch.Tensor, transpose: bool = False):
        q, scale = quantize_blocks(w, self.pow2, self.check)
        return q, scale, (q.transpose(-1, -2) if transpose else None)

    @staticmethod
    def _operand(q: torch.Tensor, scale: torch.Tensor, blocks: bool) -> torch.Tensor:
        return dequantize_blocks(q, scale) if blocks else dequantize_tiles(q, scale)

    def gemm(self, a, a_scale, b, b_scale, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
        k = b.shape[-1]
        return (dequantize_tiles(a, a_scale)[:, :k] @ self._operand(b, b_scale, b_blocks).T).to(out_dtype)

    def grouped_gemm(self, a, a_scale, b, b_scale, layout: ExpertLayout, out_dtype: torch.dtype) -> torch.Tensor:
        """Rows of expert e (128-aligned segments of `layout`) times expert e's weight b[e] [N, K]."""
        out = torch.zeros(a.shape[0], b.shape[-2], dtype=out_dtype, device=a.device)
        for expert, (start, end) in enumerate(layout.segments()):
            if end > start:
                out[start:end] = self.gemm(
                    a[start:end], a_scale[start:end], b[expert], b_scale[expert], True, out_dtype
                )
        return out

    def grouped_wgrad(self, a, a_scale, b, b_scale, layout: ExpertLayout) -> torch.Tensor:
        """Per expert e: a[:, rows of e] @ b[:, rows of e]^T in fp32; a [N, Mp] and b [K, Mp] tiled along rows."""
        out = torch.zeros(layout.num_experts, a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
        for expert, (start, end) in enumerate(layout.segments()):
            if end > start:
                a_e, b_e = a[:, start:end], b[:, start:end]
                s_a, s_b = a_scale[:, start // BLOCK : end // BLOCK], b_scale[:, start // BLOCK : end // BLOCK]
                out[expert] = self.gemm(a_e, s_a, b_e, s_b, False, torch.float32)
        return out


_BACKENDS: dict[tuple, object] = {}


def get_backend(recipe: FP8Recipe, device: torch.device):
    """The Hopper backend on CUDA devices of compute capability 9.0+ (unless the recipe asks for emulation)."""
    use_hopper = (
        recipe.backend != "emulated" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    )
    key = (recipe, use_hopper)
    if key not in _BACKENDS:
        if use_hopper:
            from .fp8_triton import HopperBackend

            _BACKENDS[key] = HopperBackend(recipe)
        else:
            _BACKENDS[key] = EmulatedBackend(recipe)
    return _BACKENDS[key]


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What an nn.Linear would return here: the autocast dtype inside autocast, else the input's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# --------------------------------------------------------------------------------------------------------------
# Autograd: a linear layer and a group of expert linears with all three GEMMs in FP8


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T. Forward: x per 1x128 tile, W per 128x128 block. Input gradient: dy per 1x128 tile along N,
    W^T reusing W's blocks. Weight gradient: dy^T and x^T per 1x128 tile along the tokens."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend, out_dtype: torch.dtype) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        m, n = x2.shape[0], weight.shape[0]
        x_q, x_s = backend.quantize_rows(x2)
        w_q, w_s, w_qt = backend.quantize_weight(weight, transpose=True)
        y = backend.gemm(x_q, x_s, w_q, w_s, True, out_dtype)[:m, :n].contiguous()  # a copy only if padded
        ctx.save_for_backward(x2, w_qt, w_s)
        ctx.backend, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = backend, x.shape, x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w_qt, w_s = ctx.saved_tensors
        backend, (m, k), n = ctx.backend, x2.shape, dy.shape[-1]
        dy2 = dy.reshape(-1, n)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = backend.quantize_rows(dy2)  # tiles along N, the reduction dimension of dx = dy W
            dx = backend.gemm(dy_q, dy_s, w_qt, w_s.transpose(-1, -2), True, ctx.x_dtype)[:m, :k]
            dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dyt_q, dyt_s = backend.quantize_rows(dy2.t())  # [N, Mp]: tiles along the tokens
            xt_q, xt_s = backend.quantize_rows(x2.t())  # [K, Mp]
            dw = backend.gemm(dyt_q, dyt_s, xt_q, xt_s, False, torch.float32)[:n, :k].to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe | None = None) -> torch.Tensor:
    """F.linear(x, weight) with the forward and both backward GEMMs in block-scaled FP8."""
    recipe = recipe or FP8Recipe()
    return FP8LinearFunction.apply(x, weight, get_backend(recipe, x.device), _output_dtype(x))


@dataclass
class ExpertLayout:
    """Token-choice pairs sorted by expert into 128-row-aligned segments of one padded buffer, so every 128-row
    block (an FP8 tile along the tokens) belongs to one expert. Built on the device without a host sync."""

    pos: torch.Tensor  # [N*k] buffer row of each sorted pair
    token_idx: torch.Tensor  # [N*k] token of each sorted pair
    order: torch.Tensor  # [N*k] flat (token, choice) index of each sorted pair
    block_expert: torch.Tensor  # [rows/128] int32 expert owning each 128-row block, -1 for unused blocks
    seg_start: torch.Tensor  # [E] int32 first row of each expert's segment (multiple of 128)
    seg_end: torch.Tensor  # [E] int32
    rows: int  # buffer rows: an upper bound, ceil128(N*k) + 128*E

    @property
    def num_experts(self) -> int:
        return self.seg_start.shape[0]

    def segments(self) -> list[tuple[int, int]]:
        return list(zip(self.seg_start.tolist(), self.seg_end.tolist(), strict=True))

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """[N*k, C] rows in sorted order -> [rows, C] padded buffer, zeros elsewhere."""
        return rows.new_zeros(self.rows, rows.shape[1]).index_copy(0, self.pos, rows)


def expert_layout(indices: torch.Tensor, num_experts: int) -> ExpertLayout:
    flat = indices.flatten()
    pairs, top_k = flat.numel(), indices.shape[1]
    order = flat.argsort(stable=True)
    sorted_expert = flat[order]
    counts = count_per_expert(flat, num_experts)  # no host sync: a compiled decode step stays one graph
    padded = (counts + BLOCK - 1) // BLOCK * BLOCK
    seg_end = padded.cumsum(0)
    seg_start = seg_end - padded
    first = counts.cumsum(0) - counts
    pos = seg_start[sorted_expert] + torch.arange(pairs, device=flat.device) - first[sorted_expert]
    rows = _ceil_to(pairs, BLOCK) + BLOCK * num_experts
    block_starts = torch.arange(0, rows, BLOCK, device=flat.device)
    block_expert = torch.searchsorted(seg_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return ExpertLayout(pos, order // top_k, order, block_expert, seg_start.int(), seg_end.int(), rows)


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Per expert e: y[rows of e] = x[rows of e] W[e]^T, with the FP8 scheme of `FP8LinearFunction`; the weight
    gradient of expert e reduces over its own 128-aligned rows only."""

    @staticmethod
    def forward(ctx, x_pad, weight, layout: ExpertLayout, backend, out_dtype):
        n, k = weight.shape[-2:]
        x_q, x_s = backend.quantize_rows(x_pad)
        w_q, w_s, w_qt = backend.quantize_weight(weight, transpose=True)
        y = backend.grouped_gemm(x_q, x_s, w_q, w_s, layout, out_dtype)[:, :n]
        ctx.save_for_backward(x_pad, w_qt, w_s)
        ctx.layout, ctx.backend, ctx.w_dtype, ctx.x_dtype = layout, backend, weight.dtype, x_pad.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_pad, w_qt, w_s = ctx.saved_tensors
        layout, backend = ctx.layout, ctx.backend
        n, k = dy.shape[1], x_pad.shape[1]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = backend.quantize_rows(dy)
            dx = backend.grouped_gemm(dy_q, dy_s, w_qt, w_s.transpose(-1, -2), layout, ctx.x_dtype)[:, :k]
        if ctx.needs_input_grad[1]:
            dyt_q, dyt_s = backend.quantize_rows(dy.t())
            xt_q, xt_s = backend.quantize_rows(x_pad.t())
            dw = backend.grouped_wgrad(dyt_q, dyt_s, xt_q, xt_s, layout)[:, :n, :k].to(ctx.w_dtype)
        return dx, dw, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Training modules: same parameters as the modules they replace (their class is swapped in place)


class FP8Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs run in block-scaled FP8; `weight` stays the master copy."""

    fp8_recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = FP8LinearFunction.apply(x, self.weight, get_backend(self.fp8_recipe, x.device), _output_dtype(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class FP8RoutedExperts(RoutedExperts):
    """RoutedExperts with both expert GEMMs (and their gradients) in FP8 over a 128-aligned grouped layout."""

    fp8_recipe: FP8Recipe = FP8Recipe()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], indices/weights [N, k] -> sum_k weight_k * expert_k(x) [N, d]."""
        backend, dtype = get_backend(self.fp8_recipe, x.device), _output_dtype(x)
        layout = expert_layout(indices, self.num_experts)
        x_pad = layout.scatter(x[layout.token_idx])  # [rows, d]
        h = FP8GroupedLinearFunction.apply(x_pad, self.gate_up_proj, layout, backend, dtype)
        gate, up = h.chunk(2, dim=-1)
        out = FP8GroupedLinearFunction.apply(self.act_fn(gate) * up, self.down_proj, layout, backend, dtype)
        out = out[layout.pos] * weights.flatten()[layout.order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, layout.token_idx, out.to(x.dtype))


# --------------------------------------------------------------------------------------------------------------
# Inference modules: FP8 weights with their `weight_scale_inv`, the official checkpoint layout


class FP8InferenceLinear(nn.Module):
    """A linear layer stored as DeepSeek ships it: `weight` float8_e4m3fn [out, in], `weight_scale_inv` float32
    [ceil(out/128), ceil(in/128)]; activations are quantised per 1x128 tile on the fly (dynamic scheme)."""

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
        backend = get_backend(self.fp8_recipe, x.device)
        x2 = x.reshape(-1, self.in_features)
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
        inter, g_inter = self.intermediate_size, math.ceil(self.intermediate_size / BLOCK)
        gate = dequantize_blocks(self.gate_up_proj[:, :inter], self.gate_up_proj_scale_inv[:, :g_inter])
        up = dequantize_blocks(self.gate_up_proj[:, inter:], self.gate_up_proj_scale_inv[:, g_inter:])
        return torch.cat([gate, up], dim=1), dequantize_blocks(self.down_proj, self.down_proj_scale_inv)

    def dequantize_(self, dtype: torch.dtype) -> RoutedExperts:
        """Turn this module, in place, into a plain RoutedExperts holding the exact dequantised weights."""
        gate_up, down = self.dequantized_weights()
        del self.gate_up_proj, self.down_proj, self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self.fp8_recipe
        self.gate_up_proj, self.down_proj = nn.Parameter(gate_up.to(dtype)), nn.Parameter(down.to(dtype))
        self.__class__ = RoutedExperts
        return self

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
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
        if type(module) is nn.Linear:
            module.__class__ = FP8Linear
        elif type(module) is RoutedExperts:
            module.__class__ = FP8RoutedExperts
        else:
            continue
        module.fp8_recipe = recipe
    return model


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
    return model


def convert_to_fp8_inference(model: nn.Module, recipe: FP8Recipe | None = None, quantize: bool = True) -> nn.Module:
    """Replace every nn.Linear (but `recipe.skip`) and RoutedExperts by FP8-weight versions, quantised from the
    current weights (`quantize=False` only allocates them, for a loader to fill). The config then carries the
    official `quantization_config`, so `save_pretrained` writes DeepSeek's FP8 checkpoint format."""
    recipe = recipe or FP8Recipe()
    config = getattr(model, "config", None)
    for name, module in list(model.named_modules()):
        if recipe.skips(name) or not name:
            continue
        if type(module) in (nn.Linear, FP8Linear):
            _replace(model, name, FP8InferenceLinear.from_linear(module, recipe, quantize))
        elif type(module) in (RoutedExperts, FP8RoutedExperts):
            _replace(model, name, FP8InferenceExperts.from_experts(module, config, recipe, quantize))
    if config is not None:
        config.quantization_config = dict(OFFICIAL_QUANTIZATION_CONFIG)
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
