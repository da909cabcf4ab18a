"""FP8 numerics the DeepSeek way, shared by every FP8 backend: the recipes, the reference quantisers (E4M3
values, activations scaled per 1x128 tile along the reduction dimension, weights per 128x128 block; or one scale
per row), the emulation backend that runs them on any device, the 128-row-aligned layout of routed experts, and
the kernel plans of the Hopper backend's rowwise quantiser (plain Python, readable without Triton).

`fp8.py` builds the FP8 layers on these; `fp8_triton.py`, the Hopper backend, reproduces the reference
quantisers bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..kernels import fbgemm_grouped
from ..kernels.fp8_blocks import BLOCK, dequantize_blocks
from ..kernels.moe_routing import count_per_expert

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
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

    `scaling`: "blockwise" (DeepSeek-V3: activations and gradients per 1x128 tile along each GEMM's reduction
    dimension, weights per 128x128 block, FP32 promotion every 128 of K) or "rowwise" (one scale per row of each
    operand over the whole reduction dimension, as torchao / torchtitan train);
    `grouped_wgrad`: the routed experts' weight gradient in "fp8" (the paper) or "bf16" (the input precision,
    through torch's grouped GEMM; the default). In FP8 the operands are scaled along each expert's tokens: blockwise,
    per 1x128 tile (a Triton kernel, ~50 TFLOP/s on the H200 against ~650 for bf16 `grouped_mm`); rowwise, one
    scale per (expert, column), as torchao's rowwise MoE training, through torch's `_scaled_grouped_mm` over two
    2-D operands;
    `linear_wgrad`: the linear layers' weight gradient in "fp8" (the paper) or "bf16" (the input precision, as
    torchao's `rowwise_with_gw_hp`: no operand scaled along the tokens, where one rowwise scale spans them all);
    `pow2_scales`: round every scale up to a power of two (UE8M0, as DeepSeek-V3.1 and DeepGEMM do);
    `backend`: "auto" (Hopper kernels on a CUDA device of compute capability 9.0+, else emulation) or "emulated";
    `gemm`: for the Hopper backend, "auto" (cuBLAS where it dispatches, else Triton), "cublas" or "triton";
    `fused_quantization`: inside `torch.compile`, quantise with torch operations that Inductor fuses with the
    neighbouring kernels (the norm or activation that produced the tensor) instead of calling the standalone
    Triton quantisers; `check_finite`: raise on NaN/inf inputs; None (default) checks where it is free (the
    emulation) and lets them propagate on the GPU, where a check costs a device sync per quantisation (NaN scales
    then make the output, and the loss, NaN);
    `skip`: names of modules (matched against the end of their qualified name) left in high precision;
    `weight_only_decode`: models with FP8 weights (`convert_to_fp8_inference`, an official FP8 checkpoint) run
    decode-sized batches on CUDA devices of compute capability 8.9+ (up to `kernels.moe_gemv.MAX_PAIRS`
    token-expert pairs, `MAX_LINEAR_ROWS` rows of a linear layer) as matrix-vector kernels that read the FP8
    weights and dequantise them in registers (FP8 storage, bf16 compute), and the routed experts of larger decode
    batches (up to `kernels.moe_grouped_gemv.MAX_GROUPED_PAIRS` pairs) as kernels grouped by expert that do the
    same; False keeps FP8 GEMMs on quantised activations there too;
    `grouped_bf16`: the routed experts' projections ("gate_up_proj", "down_proj") whose forward and input-gradient
    GEMMs stay in high precision (torch's grouped GEMM in bf16 on CUDA), for expert shapes where the device's FP8
    grouped GEMM is slower than bf16's;
    `quantize_tokens_once`: the routed experts' first projection quantises each token's row once and lays the FP8
    rows out by expert (the FP8 values and scales of laying out the bf16 rows, once per chosen expert, and quantising
    that: a row's scales depend on that row only), which moves about a quarter of the bytes; False lays the bf16 rows
    out first;
    `fast_accum`: the GEMMs of the rowwise recipe ("output": the forward's, "grad_input", "grad_weight") whose FP8
    products Hopper's tensor cores sum without promotion to FP32 (cuBLAS's fast accumulation): all three by default,
    as torchao's rowwise recipe; DeepSeek-V3 (section 3.3.2) finds such sums lose precision over long K, and the
    weight gradient's K is the step's tokens. The blockwise recipe promotes every 128 of K whatever this says;
    `grouped_gemm`: the routed experts' grouped GEMMs on a Hopper GPU, the rowwise recipe's FP8 products and the
    bf16 weight gradient of either recipe: "torch" (`torch._scaled_grouped_mm`, `torch._grouped_mm`) or "fbgemm"
    (FBGEMM's CUTLASS kernels, `kernels/fbgemm_grouped.py`, where the optional `fbgemm-gpu-genai` wheel imports;
    torch's elsewhere); for the blockwise recipe's FP8 products, "deep_gemm" (DeepSeek's DeepGEMM,
    `kernels/deep_gemm_grouped.py`, where the optional `sgl-deep-gemm` wheel imports: the input gradient read from
    the forward's weight blocks, no W^T quantised) or "fbgemm" (FBGEMM's 1x128 x 128x128 grouped GEMM); the Triton
    kernels where those do not import, and for "torch");
    `grouped_wgrad_gemm`: the kernel of that bf16 weight gradient alone: "auto" (as `grouped_gemm`), "torch"
    (`torch._grouped_mm` over the tokens, as torch's autograd computes a bf16 model's) or "fbgemm";
    `fused_moe_quantization`: the routed experts' SwiGLU, its gradient and the gradient of the sum over each token's
    experts write the FP8 rows of the GEMM operands they produce, from the registers that hold them, instead of a
    standalone quantiser reading them again (`fp8_moe.py`: Triton kernels for rowwise scaling, the rowwise recipe's
    default; the blockwise recipe's 1x128 tiles through torch operations that Inductor fuses, the combine's gradient
    in one gather; experts with `quantize_tokens_once`, both projections in FP8 and a SwiGLU activation take it, others
    the layer-by-layer path);
    `fused_mlp_quantization`: the same for the dense MLP and the shared experts while training: their SwiGLU and its
    gradient write the FP8 rows of the GEMM operands they produce, gate and up one GEMM (`fp8_mlp.py`; needs
    `linear_wgrad="bf16"`; not with `cache_weights`);
    `cache_weights`: quantise each FP8 weight once per optimizer step instead of in every forward, into a copy the
    layer keeps (`fp8_weight_cache.py`; `kernels.adamw.TritonAdamW` writes it in its update of the weight on CUDA;
    other changes to a weight make its copy afresh before the next forward; the blockwise recipe's copy keeps W^T's
    FP8 blocks too);
    `joined_projections`: while training, MLA's q_a and kv_a, and an MLP's gate and up, run as one FP8 GEMM each over
    their joined weights (`modeling.joined_projections`), so their shared input is quantised once.
    """

    scaling: str = "blockwise"
    grouped_wgrad: str = "bf16"
    linear_wgrad: str = "fp8"
    pow2_scales: bool = False
    backend: str = "auto"
    gemm: str = "auto"
    fused_quantization: bool = True
    check_finite: bool | None = None
    skip: tuple[str, ...] = field(default=("lm_head",))
    grouped_bf16: tuple[str, ...] = ()
    weight_only_decode: bool = True
    quantize_tokens_once: bool = True
    fast_accum: tuple[str, ...] = ("output", "grad_input", "grad_weight")
    grouped_gemm: str = "torch"
    grouped_wgrad_gemm: str = "auto"
    fused_moe_quantization: bool = False
    fused_mlp_quantization: bool = False
    cache_weights: bool = False
    joined_projections: bool = False

    def __post_init__(self):
        choices = {"scaling": ("blockwise", "rowwise"), "grouped_wgrad": ("fp8", "bf16"),
                   "linear_wgrad": ("fp8", "bf16"), "backend": ("auto", "emulated"),
                   "gemm": ("auto", "cublas", "triton"), "grouped_gemm": ("torch", "fbgemm", "deep_gemm"),
                   "grouped_wgrad_gemm": ("auto", "torch", "fbgemm")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"FP8Recipe.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        unknown = set(self.grouped_bf16) - {"gate_up_proj", "down_proj"}
        if unknown:
            raise ValueError(f"FP8Recipe.grouped_bf16 names gate_up_proj and down_proj only, got {sorted(unknown)}")
        unknown = set(self.fast_accum) - {"output", "grad_input", "grad_weight"}
        if unknown:
            raise ValueError(
                f"FP8Recipe.fast_accum names output, grad_input and grad_weight only, got {sorted(unknown)}"
            )
        if self.fused_mlp_quantization and self.linear_wgrad == "fp8":
            raise ValueError("FP8Recipe.fused_mlp_quantization computes the MLP's weight gradients in bf16")
        if self.grouped_gemm == "deep_gemm" and self.rowwise:
            raise ValueError("FP8Recipe.grouped_gemm='deep_gemm' needs scaling='blockwise' (DeepGEMM's 128x128 blocks)")

    @classmethod
    def named(cls, name: str, **overrides) -> FP8Recipe:
        """One of the named recipes: "deepseek" (the paper's blockwise scaling, the default) or "rowwise"."""
        if name not in FP8_RECIPES:
            raise ValueError(f"unknown FP8 recipe {name!r}: choose from {', '.join(FP8_RECIPES)}")
        return replace(FP8_RECIPES[name], **overrides)

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"

    def skips(self, name: str) -> bool:
        """Whether the module with this qualified name stays in high precision."""
        return any(name == s or name.endswith("." + s) for s in self.skip)


# "rowwise" takes the choices of its fastest measured training step (docs/PERF.md's Training): the standalone Triton
# quantisers, FBGEMM's FP8 grouped GEMMs where the wheel imports with torch's grouped GEMM for the experts' bf16
# weight gradient, the experts' SwiGLU and combine gradient writing their FP8 operands, the linear layers' weight
# gradient in bf16 (no operand quantised along the tokens, as torchao's rowwise_with_gw_hp) and the projections of a
# shared input joined
FP8_RECIPES = {
    "deepseek": FP8Recipe(),
    "rowwise": FP8Recipe(
        scaling="rowwise",
        fused_quantization=False,
        grouped_gemm="fbgemm",
        grouped_wgrad_gemm="torch",
        linear_wgrad="bf16",
        fused_moe_quantization=True,
        joined_projections=True,
    ),
}


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


def quantize_rowwise(
    x: torch.Tensor, pow2: bool = False, check: bool = True, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row over the whole last dimension: x [..., K] -> (q [..., K] e4m3, scale [..., 1] fp32).
    `amax` [..., >= rows]: each row's max |x|, known already (`column_amax` of the tensor x is a transpose of); the
    result is the same, since a max is exact."""
    amax = x.float().abs().amax(dim=-1, keepdim=True) if amax is None else amax.float()[..., : x.shape[-2], None]
    if check:
        check_finite(amax, "a row")
    scale = scales_from_amax(amax, pow2)
    return _encode(x.float(), scale), scale


def column_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each column of x [..., R, C] -> [..., C] fp32 (NaN propagates): the row amaxes of x^T, which
    `quantize_rowwise(x^T, amax=...)` takes instead of reading x^T again."""
    return x.float().abs().amax(dim=-2)


def quantize_segment_columns(
    t: torch.Tensor,
    block_expert: torch.Tensor,
    num_experts: int,
    pow2: bool = False,
    check: bool = True,
    row_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] laid out in an `ExpertLayout`'s 128-row blocks (`block_expert` [R/128]: each block's expert, -1 for
    none), scaled along its rows within each expert: one scale per (expert, column) over the expert's rows (the
    rowwise recipe's operands of the experts' FP8 weight gradient, whose reduction runs over each expert's tokens).
    `row_index` [R]: the laid-out rows are t's rows row_index (t.shape[0]: a zero row), t then the token rows
    themselves (the layout's `token_pad`), so that no laid-out copy of them is made. Returns (q^T [C, R] E4M3,
    row-major as the weight gradient's GEMM takes it; zero in blocks of no expert, whose rows no amax reads),
    scale [E, C] fp32)."""
    if row_index is not None:
        t = F.pad(t, (0, 0, 0, 1)).index_select(0, row_index)
    blocks = block_expert.long()
    nb, cols = blocks.shape[0], t.shape[1]
    tiles = torch.where((blocks >= 0)[:, None, None], t[: nb * BLOCK].float().view(nb, BLOCK, cols), 0.0)
    block_amax = tiles.abs().amax(dim=1)  # [nb, C]; NaN propagates
    if check:
        check_finite(block_amax, "an expert's column")
    index = blocks.clamp(min=0)[:, None].expand(-1, cols)  # blocks of no expert: zeros, into expert 0's max
    amax = block_amax.new_zeros(num_experts, cols).scatter_reduce_(0, index, block_amax, "amax")
    scale = scales_from_amax(amax, pow2)
    q = _encode(tiles, scale[blocks.clamp(min=0)][:, None, :])
    return q.view(nb * BLOCK, cols).t().contiguous(), scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_tiles` in float32: q [..., K] * scale of its 1x128 tile."""
    return q.float() * scale.float().repeat_interleave(BLOCK, dim=-1)[..., : q.shape[-1]]


# --------------------------------------------------------------------------------------------------------------
# Backends: the operations the FP8 layers need. Layout conventions shared by both backends:
#   quantize_rows(x [R, C]) -> q [Rp, Cp], scale [Rp, Cp/128] (blockwise: 1x128 tiles along C) or [Rp, 1]
#       (rowwise), zero rows/cols as padding;
#   quantize_weight(w [..., N, K]) -> q, scale [..., ceil(N/128), ceil(K/128)] (blockwise) or [..., N, 1];
#   quantize_weight_t(w, q, scale, prepared=None) -> the operand of w^T (input gradient): blockwise, q^T with the
#       transposed grid (the same blocks; `prepared`: that q^T, as a weight copy keeps it); rowwise, w^T quantised
#       again with one scale per row of w^T;
#   quantize_weight_and_amax_t(w) -> quantize_weight(w) and, from the same read, the `amax` that
#       quantize_weight_t(w, q, scale, prepared=amax) takes to quantise w^T without an amax pass of its own (rowwise:
#       each column's amax; None where a backend has nothing to pass on: the blockwise recipe, Inductor's fused
#       quantisation, a Triton plan that keeps the passes apart). The result is the same either way, bit for bit:
#       only which kernel reads what changes;
#   gemm(a, a_scale, b, b_scale, b_blocks) -> a @ b^T [Ma, Nb]: both operands K-contiguous, b scaled as a weight
#       (`b_blocks`) or as an activation; b may hold fewer K columns than a's zero padding;
#   grouped_gemm / grouped_wgrad: the same per 128-row expert segment of an `ExpertLayout`.
# Nothing here reads device values on the host, so a compiled step stays one graph.


class EmulatedBackend:
    """Reference numerics on any device: the reference quantisers, then FP32 products of dequantised values."""

    name = "emulated"
    device_type = None  # any
    fbgemm = fbgemm_wgrad = False  # FBGEMM's grouped kernels (products, weight gradient): the Hopper backend's only
    deep_gemm = False  # DeepGEMM's grouped kernels: the Hopper backend's only

    def __init__(self, recipe: FP8Recipe):
        self.recipe = recipe
        self.pow2, self.rowwise, self._check = recipe.pow2_scales, recipe.rowwise, recipe.check_finite is not False

    @property
    def check(self) -> bool:
        """The finite check reads a device value on the host: skipped inside a compile, to keep one graph."""
        return self._check and not torch.compiler.is_compiling()

    def quantize_rows(self, x: torch.Tensor, rows_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rowwise:
            padded = F.pad(x, (0, _ceil_to(x.shape[1], BLOCK) - x.shape[1]))
            q, scale = quantize_rowwise(padded, self.pow2, self.check)
        else:
            q, scale = quantize_tiles(x, self.pow2, self.check)
        pad = _ceil_to(x.shape[0], rows_multiple) - x.shape[0]
        return F.pad(q.view(torch.uint8), (0, 0, 0, pad)).view(FP8), F.pad(scale, (0, 0, 0, pad))

    def gather_rows(self, q: torch.Tensor, scale: torch.Tensor, index: torch.Tensor):
        """Rows `index` of `quantize_rows`' result (q, scale): the quantisation of those rows of its input."""
        return q.view(torch.uint8).index_select(0, index).view(FP8), scale.index_select(0, index)

    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rowwise(w, self.pow2, self.check) if self.rowwise else quantize_blocks(w, self.pow2, self.check)

    def quantize_weight_and_amax_t(self, w: torch.Tensor):
        return (*self.quantize_weight(w), column_amax(w) if self.rowwise else None)

    def quantize_weight_t(self, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, prepared=None):
        if self.rowwise:
            return quantize_rowwise(w.transpose(-1, -2), self.pow2, self.check, prepared)
        return q.transpose(-1, -2) if prepared is None else prepared, scale.transpose(-1, -2)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, blocks: bool) -> torch.Tensor:
        if self.rowwise:
            return q.float() * scale.float()
        return dequantize_blocks(q, scale) if blocks else dequantize_tiles(q, scale)

    def gemm(self, a, a_scale, b, b_scale, b_blocks: bool, out_dtype: torch.dtype, fast_accum: bool = True):
        """a [M, K] @ b [N, K']^T of the dequantised operands in FP32 (`fast_accum`: a GPU's choice, exact here)."""
        k = b.shape[-1]
        a_f, b_f = self.dequantize(a, a_scale, False)[:, :k], self.dequantize(b, b_scale, b_blocks)
        return (a_f @ b_f.T).to(out_dtype)

    def grouped_gemm(self, a, a_scale, b, b_scale, layout: ExpertLayout, out_dtype: torch.dtype, fast_accum=True):
        """Rows of expert e (128-aligned segments of `layout`) times expert e's weight b[e] [N, K]: each 128-row
        block times the weight of the expert that owns it, zeros for unused blocks (`fast_accum`: as `gemm`)."""
        k = b.shape[-1]
        blocks = layout.block_expert.long()  # [nb]
        a_f = self.dequantize(a, a_scale, False)[:, :k].view(blocks.shape[0], BLOCK, k)
        w = self.dequantize(b, b_scale, True)[blocks.clamp(min=0)]  # [nb, N, K]
        out = torch.bmm(a_f, w.transpose(1, 2)) * (blocks >= 0)[:, None, None]
        return out.flatten(0, 1).to(out_dtype)

    def quantize_segment_columns(self, t: torch.Tensor, layout: ExpertLayout, row_index=None):
        """The rowwise recipe's weight-gradient operand: `quantize_segment_columns` of t over the layout's experts."""
        experts = layout.num_experts
        return quantize_segment_columns(t, layout.block_expert, experts, self.pow2, self.check, row_index)

    def grouped_wgrad(self, a, a_scale, b, b_scale, layout: ExpertLayout) -> torch.Tensor:
        """Per expert e: a[:, rows of e] @ b[:, rows of e]^T in fp32; a [N, Mp] and b [K, Mp] scaled along rows
        (blockwise: per 1x128 tile; rowwise: `quantize_segment_columns`' scales, [E, N] and [E, K])."""
        blocks = layout.block_expert.long()
        nb = blocks.shape[0]

        def blocks_of(q, scale):  # the dequantised values, [nb, rows of q, 128]
            if self.rowwise:
                values = q.float()[:, : nb * BLOCK].view(q.shape[0], nb, BLOCK).transpose(0, 1)
                return values * scale.float()[blocks.clamp(min=0)][:, :, None]
            return self.dequantize(q, scale, False)[:, : nb * BLOCK].view(q.shape[0], nb, BLOCK).transpose(0, 1)

        products = torch.bmm(blocks_of(a, a_scale), blocks_of(b, b_scale).transpose(1, 2))  # [nb, N, K]
        per_block = products * (blocks >= 0)[:, None, None]
        out = torch.zeros(layout.num_experts, a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
        return out.index_add_(0, blocks.clamp(min=0), per_block)


def linear_wgrad_high_precision(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy [M, N]^T @ x [M, K] -> [N, K] in the inputs' precision (bf16 GEMMs accumulate in FP32)."""
    dtype = torch.promote_types(dy.dtype, x.dtype)
    return dy.t().to(dtype) @ x.to(dtype)


def grouped_wgrad_high_precision(
    dy: torch.Tensor, x: torch.Tensor, layout: ExpertLayout, fbgemm: bool = False
) -> torch.Tensor:
    """Per expert e: dy[rows of e]^T @ x[rows of e] -> [E, N, K] in high precision (FP32 accumulation): torch's
    grouped GEMM in bf16 on CUDA (rows past the last segment are not read), or with `fbgemm` (the backend found
    FBGEMM's kernels) FBGEMM's bf16 weight-gradient kernel; else per 128-row block."""
    if fbgemm:
        rows = fbgemm_grouped.segment_rows(layout.seg_start, layout.seg_end)
        return fbgemm_grouped.weight_grads(dy.to(torch.bfloat16), x.to(torch.bfloat16), rows)
    if dy.is_cuda:  # dy^T as a transposed view, as torch's autograd passes it for a bf16 model's weight gradient
        return torch._grouped_mm(dy.t().to(torch.bfloat16), x.to(torch.bfloat16), offs=layout.seg_end)
    blocks = layout.block_expert.long()
    nb, dtype = blocks.shape[0], torch.promote_types(dy.dtype, x.dtype)
    dy_blocks = dy[: nb * BLOCK].to(dtype).view(nb, BLOCK, -1).transpose(1, 2)  # [nb, N, 128]
    per_block = torch.bmm(dy_blocks, x[: nb * BLOCK].to(dtype).view(nb, BLOCK, -1)) * (blocks >= 0)[:, None, None]
    out = torch.zeros(layout.num_experts, dy.shape[1], x.shape[1], dtype=dtype, device=dy.device)
    return out.index_add_(0, blocks.clamp(min=0), per_block)


def grouped_weight_grad(
    backend, dy: torch.Tensor, x: torch.Tensor, layout: ExpertLayout, x_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The experts' weight gradients dy^T x over each expert's rows (laid out by `layout`), [E, N, K], in the
    backend's recipe's `grouped_wgrad` precision: bf16 (`grouped_wgrad_high_precision`), or FP8 with dy and x
    scaled along the tokens: per 1x128 tile (blockwise) or per (expert, column) (rowwise). `x_rows`: x holds the
    token rows and x_rows (the layout's `token_pad`) the token of each laid-out row (x.shape[0]: none); the rowwise
    FP8 quantiser reads them through it, the others take the laid-out copy."""
    if backend.rowwise and backend.recipe.grouped_wgrad == "fp8":
        dy_t, x_t = backend.quantize_segment_columns(dy, layout), backend.quantize_segment_columns(x, layout, x_rows)
        return backend.grouped_wgrad(*dy_t, *x_t, layout)
    if x_rows is not None:
        x = F.pad(x, (0, 0, 0, 1)).index_select(0, x_rows)
    if backend.recipe.grouped_wgrad == "bf16":
        return grouped_wgrad_high_precision(dy, x, layout, backend.fbgemm_wgrad)
    dyt_q, dyt_s = backend.quantize_rows(dy.t())
    xt_q, xt_s = backend.quantize_rows(x.t())
    return backend.grouped_wgrad(dyt_q, dyt_s, xt_q, xt_s, layout)


def grouped_linear_high_precision(x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Per expert e: x[rows of e] @ weight[e]^T -> [rows, N] in high precision, differentiable: torch's grouped GEMM
    in bf16 on CUDA (rows past the last segment are left undefined, as FP8's grouped GEMM leaves them; nothing reads
    them), else per 128-row block (zeros past the last segment)."""
    if x.is_cuda:
        return torch._grouped_mm(x.to(torch.bfloat16), weight.to(torch.bfloat16).transpose(-2, -1), offs=layout.seg_end)
    blocks = layout.block_expert.long()
    nb = blocks.shape[0]
    dtype = torch.promote_types(x.dtype, weight.dtype)
    x_blocks = x[: nb * BLOCK].to(dtype).view(nb, BLOCK, -1)  # [nb, 128, K]
    per_block = torch.bmm(x_blocks, weight[blocks.clamp(min=0)].to(dtype).transpose(1, 2))  # [nb, 128, N]
    out = (per_block * (blocks >= 0)[:, None, None]).reshape(nb * BLOCK, -1)
    return torch.cat([out, out.new_zeros(x.shape[0] - nb * BLOCK, out.shape[1])])


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


# --------------------------------------------------------------------------------------------------------------
# Kernel plans of the Hopper backend's rowwise quantiser (`fp8_triton.quantize_rowwise_triton`, whose comment
# describes the kinds): plain Python on shapes and strides, kept here so that they can be read without Triton (the
# quantisation census, `benchmarks/fp8_quant_census.py`, runs on the CPU install).

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NUM_SMS = 132  # H100/H200 SXM; only decides how the work is split
L2_STRIP_BYTES = 24 << 20  # bytes of strips in flight between their two passes ("cols"): about half of L2


class RowwisePlan(NamedTuple):
    """How `quantize_rowwise_triton` runs: `rowwise_plan` (or, for the pair of kernels that passes amaxes on,
    `rowwise_amax_plan` / `rowwise_from_amax_plan`) picks one; `benchmarks/fp8_bench.py` and
    `benchmarks/fp8_quant_census.py --time` time others."""

    kind: str  # "rows", "rows_loop", "cols", "cols_split"; "rows_amax", "cols_amax"
    block_r: int
    block_c: int
    num_warps: int
    chunk: int = 0  # cols_split, cols_amax: columns of x per program (a multiple of block_c); rows_amax: rows
    programs: int = 0  # cols: programs of the persistent grid (0: one per strip)
    fast: bool = not _INTERPRET  # GPU arithmetic (see fp8_triton); False: the reference's, as in the interpreter


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def rowwise_plan(x: torch.Tensor, rows_out: int, cols_out: int) -> RowwisePlan:
    """The kernel and block sizes for x [(E,) R, C] (either R or C contiguous) padded to [rows_out, cols_out]."""
    x3 = x if x.dim() == 3 else x[None]
    batch, rows, cols = x3.shape
    if x3.stride(2) == 1 or cols == 1:  # reduced dimension contiguous
        block_c = _pow2_at_least(cols_out)
        if block_c == 2048:  # one row a program, 4 warps: 1.14-1.21x (4 rows, 8 warps) in the H200 sweep of
            return RowwisePlan("rows", 1, 2048, 4)  # 2026-12-04 ([16384, 2048] activations, both expert weights)
        if block_c <= 16384:  # whole rows in registers: about 8192 values a program, 32 a thread
            block_r = max(1, min(64, 8192 // block_c))
            return RowwisePlan("rows", block_r, block_c, max(4, min(16, block_r * block_c // 1024)))
        return RowwisePlan("rows_loop", 4, 2048, 8)
    # rows contiguous. "cols" when there are strips for every SM and two of them per SM (else one) fit the L2 budget
    # between their two passes: the widest strips that do (32 rows: 64 bytes of bf16 a column; 16 rows: 32 bytes,
    # one sector, its neighbour read by the next program at the same time), tiles of 8192 values
    for per_sm, block_r in ((2, 32), (2, 16), (1, 32), (1, 16)):
        strips = batch * _cdiv(rows_out, block_r)
        if strips >= per_sm * NUM_SMS and per_sm * NUM_SMS * cols * block_r * x.element_size() <= L2_STRIP_BYTES:
            return RowwisePlan("cols", block_r, 8192 // block_r, 8, programs=per_sm * NUM_SMS)
    block_r, block_c = 64, 128  # 128 bytes of bf16 per column, tiles of [128, 64]
    strips = batch * _cdiv(rows_out, block_r)
    chunks = max(1, min(_cdiv(4 * NUM_SMS, strips), _cdiv(cols_out, 4 * block_c)))
    if chunks == 1:  # enough strips, or too short a reduction to split: one launch, a program per strip
        return RowwisePlan("cols", block_r, block_c, 8)
    return RowwisePlan("cols_split", block_r, block_c, 8, chunk=_ceil_to(_cdiv(cols_out, chunks), block_c))


def rowwise_amax_plan(x: torch.Tensor, rows_out: int, cols_out: int) -> RowwisePlan | None:
    """The "rows_amax" plan of x [E, R, C] (C contiguous): the "rows" kernel looping over `chunk` rows a program,
    which also folds each column's amax over them and merges it into the column amaxes with one atomic max per column
    and program (about 8 programs an SM). Only for a batch of matrices (the experts' weights), whose column amaxes
    take the atomics of few programs each (11 and 16 at the bench): there the pair beat the rows pass plus the
    transpose's own amax pass in the H200 sweep of 2026-12-04e (gate_up [64, 2816, 2048]: 0.370 + 0.274 ms against
    0.285 + 0.538; down [64, 2048, 1408]: 0.205 + 0.145 against 0.187 + 0.259). None for a single matrix (where
    hundreds of programs merge into each column: activations [16384, 2048] took 0.072 ms at best against the rows
    pass's 0.031, and the step's 206 launches 27.8 ms) and for rows too wide for registers (wider than 16384): the
    two passes then stay apart."""
    if x.dim() == 2 or x.shape[0] == 1:
        return None
    batch = x.shape[0]
    block_c = _pow2_at_least(cols_out)
    if block_c > 16384:
        return None
    block_r = max(1, 2048 // block_c)  # at least 2048 values a step, 16 a thread
    rows = min(256, _pow2_at_least(_cdiv(batch * rows_out, 8 * NUM_SMS), block_r), _pow2_at_least(rows_out, block_r))
    return RowwisePlan("rows_amax", block_r, block_c, max(4, min(16, block_r * block_c // 512)), chunk=rows)


def rowwise_from_amax_plan(x: torch.Tensor, rows_out: int, cols_out: int) -> RowwisePlan:
    """The "cols_amax" plan of x [(E,) R, C] with R contiguous (a transposed view) whose rows' amaxes are known: the
    second launch of "cols_split" alone, tiles of [128, 64] and chunks of 512 columns, the best of the H200 sweep of
    2026-12-04e for both transposed expert weights (0.274 and 0.145 ms, against 0.292 and 0.154 with one chunk a
    strip; [256, 32] and [512, 16] tiles 6-27% slower)."""
    return RowwisePlan("cols_amax", 64, 128, 8, chunk=min(512, _ceil_to(cols_out, 128)))
