"""DeepGEMM's grouped GEMMs for the blockwise recipe (`FP8Recipe(grouped_gemm="deep_gemm")`): the recipe's checks,
the contiguous layout's row experts, the experts' input gradient taken from the forward's weight blocks (the wiring,
on the CPU, against the default path's W^T), and, on a Hopper GPU with the sgl-deep-gemm wheel, both kernels against
float64 products of the dequantised operands."""

import pytest
import torch

from hf_deepseek.kernels import deep_gemm_grouped
from hf_deepseek.kernels.fp8_blocks import dequantize_blocks
from hf_deepseek.modeling.fp8 import FP8GroupedLinearFunction, FP8Recipe, get_backend
from hf_deepseek.modeling.fp8_numerics import EmulatedBackend, dequantize_tiles, expert_layout


def test_deep_gemm_is_the_blockwise_recipes_choice_only():
    with pytest.raises(ValueError, match=r"grouped_gemm='deep_gemm' needs scaling='blockwise'"):
        FP8Recipe.named("rowwise", grouped_gemm="deep_gemm")
    recipe = FP8Recipe.named("deepseek", grouped_gemm="deep_gemm")
    assert not get_backend(recipe, torch.device("cpu")).deep_gemm  # the emulation elsewhere


def test_row_experts_name_each_laid_out_rows_segment():
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(300)])  # experts 6, 7 idle
    layout = expert_layout(indices, 8)
    experts = deep_gemm_grouped.row_experts(layout.block_expert)
    assert experts.dtype == torch.int32 and experts.shape == (layout.rows,)
    want = torch.full((layout.rows,), -1, dtype=torch.int32)
    for e, (start, end) in enumerate(layout.segments()):
        want[start:end] = e
    assert torch.equal(experts, want)


class _NNEmulation(EmulatedBackend):
    """The emulation with DeepGEMM's input-gradient contract: dy W[e] from W's forward blocks, in float64."""

    deep_gemm = True

    def grouped_gemm_nn(self, a, a_scale, w, w_scale, layout, out_dtype):
        a64 = dequantize_tiles(a, a_scale).double()
        w64 = dequantize_blocks(w, w_scale).double()
        out = torch.zeros(a.shape[0], w.shape[-1], dtype=torch.float64)
        for e, (start, end) in enumerate(layout.segments()):
            out[start:end] = a64[start:end] @ w64[e, : a.shape[1]]
        return out.to(out_dtype)


def test_the_experts_input_gradient_reads_the_forward_weight_blocks():
    """With a backend that has DeepGEMM, the input gradient goes to its nn product with the forward's FP8 weight and
    block scales (no W^T quantised), and equals the default path's dy (W^T's same blocks) up to float32 sums."""
    gen = torch.Generator().manual_seed(1)
    indices = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(200)])
    layout = expert_layout(indices, 4)
    x = torch.randn(layout.rows, 256, generator=gen).requires_grad_(True)
    w = (torch.randn(4, 384, 256, generator=gen) / 16).requires_grad_(True)
    dy = torch.randn(layout.rows, 384, generator=gen)
    recipe = FP8Recipe.named("deepseek", backend="emulated", grouped_gemm="deep_gemm")
    tensors = (layout.block_expert, layout.seg_start, layout.seg_end)
    grads = []
    for backend in (EmulatedBackend(recipe), _NNEmulation(recipe)):
        if backend.deep_gemm:
            backend.quantize_weight_t = lambda *args: pytest.fail("W^T quantised although the nn product reads W")
        y = FP8GroupedLinearFunction.apply(x, w, *tensors, backend, torch.float32)
        (got,) = torch.autograd.grad(y, x, dy)
        grads.append(got)
    end = int(layout.seg_end[-1])
    default, nn = grads[0][:end], grads[1][:end]
    assert (nn - default).norm() / default.norm() < 1e-6


gpu = pytest.mark.gpu


@gpu
def test_deep_gemm_grouped_kernels_match_float64_on_the_gpu():
    """Both kernels over 128-aligned segments with idle experts and unused blocks past the last segment (skipped:
    expert -1), against float64 products of the dequantised FP8 operands."""
    if not deep_gemm_grouped.available():
        pytest.skip("needs the sgl-deep-gemm wheel on a Hopper GPU")
    backend = get_backend(FP8Recipe.named("deepseek", grouped_gemm="deep_gemm"), torch.device("cuda"))
    assert backend.deep_gemm
    gen = torch.Generator().manual_seed(4)
    indices = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(700)]).cuda()
    layout = expert_layout(indices, 8)
    x = torch.randn(layout.rows, 512, generator=gen).cuda()
    w = (torch.randn(8, 384, 512, generator=gen) / 16).cuda()
    dy = torch.randn(layout.rows, 384, generator=gen).cuda()
    x_q, x_s = backend.quantize_rows(x)
    w_q, w_s = backend.quantize_weight(w)
    dy_q, dy_s = backend.quantize_rows(dy)
    y = backend.grouped_gemm(x_q, x_s, w_q, w_s, layout, torch.float32)
    dx = backend.grouped_gemm_nn(dy_q, dy_s, w_q, w_s, layout, torch.float32)
    x64, dy64 = dequantize_tiles(x_q, x_s).double(), dequantize_tiles(dy_q, dy_s).double()
    w64 = dequantize_blocks(w_q, w_s).double()
    end = int(layout.seg_end[-1])
    want_y = torch.cat([x64[s:e] @ w64[i].T for i, (s, e) in enumerate(layout.segments())])
    want_dx = torch.cat([dy64[s:e] @ w64[i] for i, (s, e) in enumerate(layout.segments())])
    assert (y[:end].double() - want_y).norm() / want_y.norm() < 4e-3  # bf16 output rounding
    assert (dx[:end].double() - want_dx).norm() / want_dx.norm() < 4e-3
