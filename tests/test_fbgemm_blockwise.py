"""FBGEMM's blockwise grouped GEMM for the paper's recipe (`FP8Recipe.named("deepseek", grouped_gemm="fbgemm")`):
the groups that cover an expert layout's buffer, the tile scales moved into FBGEMM's grouped M-major layout (against
a loop over the groups as FBGEMM's own quantiser writes them), and, on a Hopper GPU with the fbgemm-gpu-genai wheel,
the products against float64 products of the dequantised operands."""

import pytest
import torch

from hf_deepseek.evals.bench_train import variant_recipe
from hf_deepseek.kernels import fbgemm_grouped
from hf_deepseek.kernels.fp8_blocks import dequantize_blocks
from hf_deepseek.modeling.fp8 import FP8Recipe, get_backend
from hf_deepseek.modeling.fp8_numerics import EmulatedBackend, dequantize_tiles, expert_layout


def _layout(seed: int, experts: int = 8, used: int = 6, tokens: int = 300):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(used, generator=gen)[:2] for _ in range(tokens)])  # the last experts idle
    return expert_layout(indices, experts)


def test_tile_scales_in_fbgemms_grouped_m_major_layout():
    """Group g (rows s .. s + m) stores its scales as [K/128, m] from offset s * K/128, as FBGEMM's
    `quantize_fp8_group(x, m_sizes=...)` writes them, with idle experts' empty groups; the unused rows past the last
    group keep row-major places after them; the input may be column-major, as the quantisers give it."""
    layout = _layout(1)
    tiles = 3
    scale = torch.rand(layout.rows, tiles).t().contiguous().t()  # column-major
    rows = fbgemm_grouped.segment_rows(layout.seg_start, layout.seg_end)
    assert int(rows[-2:].sum()) == 0 and int(layout.seg_end[-1]) < layout.rows  # idle experts, unused rows
    got = fbgemm_grouped.grouped_m_major_scales(scale, layout.seg_start, rows).flatten()
    want = torch.empty(layout.rows * tiles)
    for start, size in zip(layout.seg_start.tolist(), rows.tolist(), strict=True):
        want[start * tiles : (start + size) * tiles] = scale[start : start + size].t().flatten()
    end = int(layout.seg_end[-1])
    want[end * tiles :] = scale[end:].flatten()
    assert torch.equal(got, want)


def test_the_bench_variant_is_the_papers_recipe_with_fbgemm_and_the_cpu_emulates_it():
    recipe = variant_recipe("hf_deepseek-fp8-fbgemm-blockwise")
    assert recipe == FP8Recipe.named("deepseek", grouped_gemm="fbgemm") and recipe.scaling == "blockwise"
    assert type(get_backend(recipe, torch.device("cpu"))) is EmulatedBackend
    fast = variant_recipe("hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad")
    assert fast.scaling == "blockwise" and fast.grouped_gemm == "fbgemm" and fast.grouped_wgrad_gemm == "torch"
    assert fast.linear_wgrad == "bf16" and fast.joined_projections


@pytest.mark.gpu
def test_fbgemm_blockwise_grouped_gemm_matches_float64_on_the_gpu():
    """The product over 128-aligned segments with idle experts and unused rows past the last segment (the input
    gradient makes the same call on W^T's blocks), against float64 products of the dequantised FP8 operands."""
    if not torch.cuda.is_available() or not fbgemm_grouped.blockwise_available():
        pytest.skip("needs the fbgemm-gpu-genai wheel on a Hopper GPU")
    backend = get_backend(FP8Recipe.named("deepseek", grouped_gemm="fbgemm"), torch.device("cuda"))
    assert backend.fbgemm_blockwise
    gen = torch.Generator().manual_seed(4)
    indices = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(700)]).cuda()
    layout = expert_layout(indices, 8)
    x = layout.scatter(torch.randn(1400, 512, generator=gen).cuda())  # zeros in the padding, as the layer lays out
    w = (torch.randn(8, 384, 512, generator=gen) / 16).cuda()
    x_q, x_s = backend.quantize_rows(x)
    w_q, w_s = backend.quantize_weight(w)
    y = backend.grouped_gemm(x_q, x_s, w_q, w_s, layout, torch.float32)
    x64, w64 = dequantize_tiles(x_q, x_s).double(), dequantize_blocks(w_q, w_s).double()
    end = int(layout.seg_end[-1])
    want = torch.cat([x64[s:e] @ w64[i].T for i, (s, e) in enumerate(layout.segments())])
    assert (y[:end].double() - want).norm() / want.norm() < 4e-3  # bf16 output rounding
