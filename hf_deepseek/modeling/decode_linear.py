"""Dense layers whose single decode row takes the Triton matrix-vector kernel (`kernels.moe_gemv.linear_gemv`)
instead of cuBLAS (HF_DEEPSEEK_LINEAR_GEMV=0 keeps cuBLAS).

At batch 1 on an H200 a bf16 decode step spent about 0.41 ms of 1.37 in ~70 cuBLAS matrix-vector products of the
attention projections, shared experts and dense MLP, 3-7 us each where their weights take 1-2 us to read
(docs/decode-h200/profile_ours-fast_b1_c2048_2026-12-04d.txt); through the tuned kernel they took 232 us against
cuBLAS's 330 (docs/PERF.md, 2026-12-04g). Before a decode step compiles (transformers'
`get_compiled_call`, generate()'s device loop), `use_decode_linears` turns the model's plain nn.Linear layers (not
the LM head, which cuBLAS reads at the memory floor) into `DecodeLinear`: the same parameters and state dict, the
kernel for `MAX_BF16_LINEAR_ROWS` row without gradients on CUDA, with HF_DEEPSEEK_LINEAR_ROWS=1 the rows kernel
(`kernels/linear_rows.py`: the weight read once for up to 64 rows; opt-in, slower than cuBLAS for bf16) for a few
more, `F.linear` otherwise. FP8 layers are other classes and keep their own kernels."""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear_rows, moe_gemv


class DecodeLinear(nn.Linear):
    """nn.Linear whose decode rows (bf16, CUDA, no gradients) take `linear_gemv` (MAX_BF16_LINEAR_ROWS) or, opted
    in, `linear_rows` (up to its MAX_ROWS)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if moe_gemv.usable_linear(rows, self.weight):
            y = moe_gemv.linear_gemv(rows, self.weight).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if linear_rows.usable(rows, self.weight):
            y = linear_rows.linear_rows(rows, self.weight).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module) -> int:
    """Unless HF_DEEPSEEK_LINEAR_GEMV=0: make `model`'s plain nn.Linear layers but its output head DecodeLinear, in
    place (idempotent). Returns how many it changed (0 when the switch is off)."""
    if not moe_gemv.LINEAR_GEMV:
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module is not head:
            module.__class__ = DecodeLinear
            changed += 1
    return changed


def single_decode_row(x: torch.Tensor, *linears: nn.Module) -> torch.Tensor | None:
    """x as rows [T, K] when `linears` can take a fused launch for it: each a DecodeLinear without bias over x's
    width and the first's weight dtype, and x the single decode row the matrix-vector kernel serves; else None."""
    first = linears[0]
    if not all(type(m) is DecodeLinear and m.bias is None and m.in_features == first.in_features for m in linears):
        return None
    if any(m.weight.dtype != first.weight.dtype for m in linears):
        return None
    rows = x.reshape(-1, first.in_features)
    return rows if moe_gemv.usable_linear(rows, first.weight) else None


def fused_gate_up(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """act(gate(x)) * up(x) of a SwiGLU MLP (`layers.SwiGLUMLP`) in one launch when the activation is SiLU and
    HF_DEEPSEEK_FUSED_GATE_UP is on (the default): `moe_gemv.gate_up_gemv` for bf16 layers where `single_decode_row`
    serves both, `moe_gemv.gate_up_gemv_fp8` for FP8 ones where `fp8_decode_rows` does; None otherwise (the caller
    computes it as before)."""
    gate, up = mlp.gate_proj, mlp.up_proj
    if not (moe_gemv.FUSED_GATE_UP and moe_gemv.is_silu(mlp.act_fn)):
        return None
    if (rows := single_decode_row(x, gate, up)) is not None:
        act = moe_gemv.gate_up_gemv(rows, gate.weight, up.weight)
    elif (rows := fp8_decode_rows(x, gate, up)) is not None:
        act = moe_gemv.gate_up_gemv_fp8(rows, gate.weight, gate.weight_scale_inv, up.weight, up.weight_scale_inv)
    else:
        return None
    return act.view(*x.shape[:-1], gate.out_features)


def fp8_decode_rows(x: torch.Tensor, *linears: nn.Module) -> torch.Tensor | None:
    """x as rows [T, K] when `linears` are FP8 layers (`fp8.FP8InferenceLinear`: FP8 weight, its block scales,
    weight-only decode) without bias over x's width whose few decode rows `moe_gemv.linear_gemv_fp8` serves; else
    None."""
    first = linears[0]
    for m in linears:
        recipe = getattr(m, "fp8_recipe", None)
        if getattr(m, "weight_scale_inv", None) is None or recipe is None or not recipe.weight_only_decode:
            return None
        if m.bias is not None or m.in_features != first.in_features or m.weight.dtype != torch.float8_e4m3fn:
            return None
    rows = x.reshape(-1, first.in_features)
    return rows if moe_gemv.usable_linear_fp8(rows, first.weight) else None


def fused_pair(first: nn.Module, second: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first(x), second(x)) through one launch of `moe_gemv.linear_gemv_pair` (bf16 layers, `single_decode_row`)
    or `moe_gemv.linear_gemv_pair_fp8` (FP8 layers, `fp8_decode_rows`) when `moe_gemv.FUSED_Q_KV_A` (the default;
    HF_DEEPSEEK_FUSED_Q_KV_A=0 turns it off); None otherwise (the caller applies them as before)."""
    if not moe_gemv.FUSED_Q_KV_A:
        return None
    rows = single_decode_row(x, first, second)
    if rows is not None:
        out = moe_gemv.linear_gemv_pair(rows, first.weight, second.weight)
    elif (rows := fp8_decode_rows(x, first, second)) is not None:
        out = moe_gemv.linear_gemv_pair_fp8(
            rows, first.weight, first.weight_scale_inv, second.weight, second.weight_scale_inv
        )
    else:
        return None
    return _split_pair(out, first, second, x)


def fused_norm_pair(
    norm: nn.Module, first: nn.Module, second: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first(norm(x)), second(norm(x))) through one launch of `moe_gemv.norm_linear_gemv_pair` (bf16 layers,
    `single_decode_row`) or `moe_gemv.norm_linear_gemv_pair_fp8` (FP8 layers, `fp8_decode_rows`) when `norm` is an
    RMSNorm of x's dtype, with HF_DEEPSEEK_FUSED_INPUT_NORM and the pair's HF_DEEPSEEK_FUSED_Q_KV_A on (both are by
    default); None otherwise (the caller applies them as before)."""
    if not (moe_gemv.FUSED_INPUT_NORM and moe_gemv.FUSED_Q_KV_A) or norm.weight.dtype != x.dtype:
        return None
    if (rows := single_decode_row(x, first, second)) is not None:
        out = moe_gemv.norm_linear_gemv_pair(rows, norm.weight, norm.eps, first.weight, second.weight)
    elif (rows := fp8_decode_rows(x, first, second)) is not None:
        out = moe_gemv.norm_linear_gemv_pair_fp8(
            rows, norm.weight, norm.eps, first.weight, first.weight_scale_inv, second.weight, second.weight_scale_inv
        )
    else:
        return None
    return _split_pair(out, first, second, x)


def _split_pair(out: torch.Tensor, first: nn.Module, second: nn.Module, x: torch.Tensor):
    """A pair launch's joined rows [T, N1 + N2] -> (first's, second's) in x's leading shape."""
    one, two = out.split([first.out_features, second.out_features], dim=-1)
    return one.view(*x.shape[:-1], -1), two.view(*x.shape[:-1], -1)


def fused_norm_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """linear(norm(x)) through one launch of `moe_gemv.norm_linear_gemv` (bf16 `linear`, `single_decode_row`) or
    `moe_gemv.norm_linear_gemv_fp8` (an FP8 layer, `fp8_decode_rows`) when `norm` is an RMSNorm (its `weight` and
    `eps`) of x's dtype and HF_DEEPSEEK_FUSED_NORM_LINEAR=1; None otherwise (the caller applies them as before)."""
    if not moe_gemv.FUSED_NORM_LINEAR or norm.weight.dtype != x.dtype:
        return None
    if (rows := single_decode_row(x, linear)) is not None:
        out = moe_gemv.norm_linear_gemv(rows, norm.weight, norm.eps, linear.weight)
    elif (rows := fp8_decode_rows(x, linear)) is not None:
        out = moe_gemv.norm_linear_gemv_fp8(rows, norm.weight, norm.eps, linear.weight, linear.weight_scale_inv)
    else:
        return None
    return out.view(*x.shape[:-1], -1)


__all__ = [
    "DecodeLinear",
    "fused_gate_up",
    "fused_norm_linear",
    "fused_norm_pair",
    "fp8_decode_rows",
    "fused_pair",
    "single_decode_row",
    "use_decode_linears",
]
