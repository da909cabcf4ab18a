"""The routed experts' whole FP8 MLP in one autograd function (`FP8Recipe.fused_moe_quantization`, `fp8_moe.py`):
its torch references against float64 autograd, the module against the layer-by-layer path it replaces, and on the
GPU its Triton kernels against the references and the module against the emulation."""

import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from hf_deepseek.modeling import fp8_moe
from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training
from hf_deepseek.modeling.fp8_numerics import _ceil_to, quantize_rowwise
from hf_deepseek.modeling.moe import RoutedExperts

gpu = pytest.mark.gpu
FUSED = FP8Recipe.named("rowwise", backend="emulated")  # the rowwise recipe's default: the whole MLP fused
LAYER_BY_LAYER = dataclasses.replace(FUSED, fused_moe_quantization=False)
# the paper's recipe: the layer-by-layer path by default, the whole MLP (1x128 tiles) with the field set
BLOCKWISE = FP8Recipe.named("deepseek", backend="emulated")
RECIPE_PAIRS = {
    "rowwise": (FUSED, LAYER_BY_LAYER),
    # the experts' weight gradient in FP8 (each expert's rows scaled per column): the same operands either way
    "rowwise-fp8-wgrad": tuple(dataclasses.replace(r, grouped_wgrad="fp8") for r in (FUSED, LAYER_BY_LAYER)),
    "deepseek": (dataclasses.replace(BLOCKWISE, fused_moe_quantization=True), BLOCKWISE),
}
NAMES = ("output", "d tokens", "d routing weights", "d gate_up", "d down")


def test_swiglu_references_match_float64_autograd():
    """The SwiGLU and its hand-written gradient against torch's silu and autograd, in float64."""
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(50, 2 * 24, generator=gen, dtype=torch.float64) * 4).requires_grad_(True)
    d_h = torch.randn(50, 24, generator=gen, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    h = F.silu(gate) * up
    (want,) = torch.autograd.grad(h, gate_up, d_h)
    torch.testing.assert_close(fp8_moe.swiglu_reference(gate_up.detach()), h.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(fp8_moe.swiglu_backward_reference(d_h, gate_up.detach()), want, rtol=1e-13, atol=1e-15)


def test_combine_backward_reference_matches_float64_autograd_and_ignores_padding_rows():
    """out[t] = sum of row_weight[r] * y[r] over t's laid-out rows: the gradients of y and of the row weights against
    autograd, with padding rows (token N) whose y holds NaN, as the grouped GEMM's unwritten rows may."""
    gen = torch.Generator().manual_seed(1)
    tokens, hidden, rows = 7, 5, 24
    token_pad = torch.full((rows,), tokens)
    token_pad[torch.randperm(rows, generator=gen)[: 2 * tokens]] = torch.arange(tokens).repeat(2)
    row_weight = (torch.rand(rows, generator=gen, dtype=torch.float64) * (token_pad < tokens)).requires_grad_(True)
    y = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    y[token_pad == tokens] = float("nan")
    y_clean = torch.where((token_pad < tokens)[:, None], y, 0.0).requires_grad_(True)
    out = torch.zeros(tokens + 1, hidden, dtype=torch.float64).index_add(0, token_pad, row_weight[:, None] * y_clean)
    d_out = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    d_y_want, d_w_want = torch.autograd.grad(out[:tokens], [y_clean, row_weight], d_out)
    d_y, d_w = fp8_moe.combine_backward_reference(d_out, token_pad, row_weight.detach(), y)
    torch.testing.assert_close(d_y, d_y_want, rtol=1e-14, atol=0)
    torch.testing.assert_close(d_w, d_w_want, rtol=1e-14, atol=1e-15)


def experts_and_inputs(dtype: torch.dtype, device="cpu"):
    """Experts with an idle one, tokens choosing over the rest, and an output gradient."""
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=48)
    torch.manual_seed(9)
    experts = RoutedExperts(cfg).to(dtype)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(300, cfg.hidden_size).to(dtype)
    indices = torch.stack([torch.randperm(3)[:2] for _ in range(300)])  # expert 3 idle
    weights, d_out = torch.rand(300, 2), torch.randn(300, cfg.hidden_size).to(dtype)
    return experts, (x, indices, weights, d_out)


def output_and_gradients(experts, recipe, x, indices, weights, d_out):
    module = convert_to_fp8_training(copy.deepcopy(experts), recipe)
    x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = module(x, indices, weights)
    return (out, *torch.autograd.grad(out, [x, weights, module.gate_up_proj, module.down_proj], d_out))


@pytest.mark.parametrize("recipe", list(RECIPE_PAIRS))
def test_fused_moe_quantisation_computes_what_the_layer_by_layer_path_does(recipe):
    """The whole-MLP function against the layer-by-layer FP8 path (emulated, both recipes), in float32: the output
    and the gradients of the tokens, the routing weights and both expert weights. The SwiGLU's values are the same
    either way, so the FP8 operands and the output are identical; the gradients' sums run in other orders."""
    experts, inputs = experts_and_inputs(torch.float32)
    fused = output_and_gradients(experts, RECIPE_PAIRS[recipe][0], *inputs)
    apart = output_and_gradients(experts, RECIPE_PAIRS[recipe][1], *inputs)
    assert torch.equal(fused[0], apart[0])
    for name, got, want in zip(NAMES, fused, apart, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert (got - want).norm() / want.norm() < 1e-5, name
    assert fused[3].abs().sum() > 0 and not fused[3][3].any() and not fused[4][3].any()  # expert 3: no gradient


@pytest.mark.parametrize("recipe", list(RECIPE_PAIRS))
def test_fused_moe_quantisation_in_bf16_is_the_layer_by_layer_path_bit_for_bit(recipe):
    """In bf16 the function rounds every intermediate where eager torch and autograd round the layer-by-layer
    path's (silu(gate), then its product with up; d_h * up before silu's derivative; each product of the routing
    weight's gradient), so its output and all four gradients are that path's, bit for bit."""
    experts, inputs = experts_and_inputs(torch.bfloat16)
    fused = output_and_gradients(experts, RECIPE_PAIRS[recipe][0], *inputs)
    apart = output_and_gradients(experts, RECIPE_PAIRS[recipe][1], *inputs)
    for name, got, want in zip(NAMES, fused, apart, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_fused_moe_quantisation_takes_either_weight_gradient_and_leaves_other_experts_layer_by_layer(monkeypatch):
    calls = []  # the function's calls, each answered with its first argument (x, of the output's shape)
    monkeypatch.setattr(fp8_moe.FP8RoutedMLPFunction, "apply", lambda *a: calls.append(a) or a[0])
    experts, inputs = experts_and_inputs(torch.float32)
    for overrides, fused in (({"quantize_tokens_once": False}, 0), ({"grouped_bf16": ("down_proj",)}, 0), ({}, 1),
                             ({"grouped_wgrad": "fp8"}, 1)):  # fmt: skip
        before = len(calls)
        module = convert_to_fp8_training(copy.deepcopy(experts), dataclasses.replace(FUSED, **overrides))
        module(*inputs[:3])
        assert len(calls) - before == fused, overrides
    fused_blocks = RECIPE_PAIRS["deepseek"][0]  # DeepGEMM's input gradient reads W's blocks: layer by layer
    for recipe, wanted in ((dataclasses.replace(fused_blocks, grouped_gemm="deep_gemm"), 2), (fused_blocks, 3)):
        convert_to_fp8_training(copy.deepcopy(experts), recipe)(*inputs[:3])
        assert len(calls) == wanted, recipe


# ---------------------------------------------------------------------------------------------------------------
# GPU


def quantised_as_reference(v: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, pow2: bool) -> bool:
    rows, cols = v.shape
    q_ref, s_ref = quantize_rowwise(F.pad(v, (0, _ceil_to(cols, 16) - cols, 0, _ceil_to(rows, 16) - rows)), pow2, False)
    return torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, s_ref)


def within_a_rounding_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-30).all())


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("rows,inter,hidden", [(1030, 1408, 2048), (77, 40, 72)])
def test_fused_moe_kernels_match_the_references_on_the_gpu(rows, inter, hidden, pow2):
    """The three Triton kernels at the bench's expert widths and at odd ones: bf16 results within a rounding step of
    the references (the combine's exactly), FP8 rows bit for bit the rowwise quantisation of those results."""
    from hf_deepseek.modeling import fp8_moe_triton as kernels

    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * inter, generator=gen) * torch.logspace(-3, 2, rows)[:, None]).bfloat16().cuda()
    h, q, scale = kernels.swiglu_rows_triton(gate_up, pow2)
    assert within_a_rounding_step(h, fp8_moe.swiglu_reference(gate_up)) and quantised_as_reference(h, q, scale, pow2)
    d_h = torch.randn(rows, inter, generator=gen).bfloat16().cuda()
    d_gate_up, q, scale = kernels.swiglu_backward_rows_triton(d_h, gate_up, pow2)
    assert within_a_rounding_step(d_gate_up, fp8_moe.swiglu_backward_reference(d_h, gate_up))
    assert quantised_as_reference(d_gate_up, q, scale, pow2)
    tokens = rows // 3
    token_pad = torch.randint(0, tokens + 1, (rows,), generator=gen).cuda()
    row_weight = torch.rand(rows, generator=gen).cuda() * (token_pad < tokens)
    d_out = torch.randn(tokens, hidden, generator=gen).bfloat16().cuda()
    y = torch.randn(rows, hidden, generator=gen).bfloat16().cuda()
    y[token_pad == tokens] = float("nan")
    d_y, q, scale, d_w = kernels.combine_backward_rows_triton(d_out, token_pad, row_weight, y, pow2)
    want_d_y, want_d_w = fp8_moe.combine_backward_reference(d_out, token_pad, row_weight, y)
    assert torch.equal(d_y, want_d_y) and quantised_as_reference(d_y, q, scale, pow2)
    assert within_a_rounding_step(d_w, want_d_w)  # sums in another order, then rounded to bf16


@gpu
@pytest.mark.parametrize("grouped_gemm", ["fbgemm", "torch"])
def test_fused_moe_quantisation_on_the_gpu_is_as_close_to_float32_as_the_layer_by_layer_emulation(grouped_gemm):
    """The module with `fused_moe_quantization` on the GPU (Triton kernels, FBGEMM's or torch's grouped GEMMs), in
    bf16: each result no further from the float32 emulation than the layer-by-layer bf16 emulation is (the FP8
    roundings of a bf16 step move results by about 2% whichever way they are computed), and within a tenth of
    that of the layer-by-layer path on the GPU (its kernels' sigmoid and sums differ from torch's by ulps, which
    moves a few E4M3 values by a step); an idle expert's weight gradient zero."""
    from hf_deepseek.kernels import fbgemm_grouped

    if grouped_gemm == "fbgemm" and not fbgemm_grouped.available():
        pytest.skip("needs the fbgemm-gpu-genai wheel on a Hopper GPU")
    experts, (x, indices, weights, d_out) = experts_and_inputs(torch.bfloat16)
    recipe = FP8Recipe.named("rowwise", grouped_gemm=grouped_gemm, fused_moe_quantization=True)
    torch.cuda.empty_cache()
    on_gpu = [t.cuda() for t in (x, indices, weights, d_out)]
    got = output_and_gradients(copy.deepcopy(experts).cuda(), recipe, *on_gpu)
    gpu_apart = output_and_gradients(
        copy.deepcopy(experts).cuda(), dataclasses.replace(recipe, fused_moe_quantization=False), *on_gpu
    )
    apart = output_and_gradients(experts, LAYER_BY_LAYER, x, indices, weights, d_out)
    wide = output_and_gradients(
        copy.deepcopy(experts).float(), LAYER_BY_LAYER, x.float(), indices, weights, d_out.float()
    )
    for name, g, ga, a, ref in zip(NAMES, got, gpu_apart, apart, wide, strict=True):
        g, ga = g.float().cpu(), ga.float().cpu()
        assert torch.isfinite(g).all(), name
        error, error_apart = ((t.float() - ref).norm() / ref.norm() for t in (g, a))
        assert error < 1.3 * error_apart + 2e-3, (name, float(error), float(error_apart))
        assert (g - ga).norm() / ga.norm() < 0.1 * error_apart + 1e-4, (name, float((g - ga).norm() / ga.norm()))
    assert not got[3][3].any() and not got[4][3].any(), "an idle expert got a weight gradient"


def test_gradient_comparison_script_finds_the_fused_and_layer_by_layer_gradients_equal_uncompiled(tmp_path):
    """benchmarks/fused_moe_gradients.py on the CPU, uncompiled (emulated FP8, bf16): every parameter's gradient of the
    fused step is the layer-by-layer step's bit for bit, and both are FP8's few percent from bf16's."""
    path = Path(__file__).parents[1] / "benchmarks/fused_moe_gradients.py"
    spec = importlib.util.spec_from_file_location("fused_moe_gradients", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "gradients.json"
    argv = ["fused_moe_gradients.py", "--device", "cpu", "--shape", "tiny", "--eager", "--json", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        script.main()
    result = json.loads(out.read_text())
    rows = {r["parameter"]: r for r in result["parameters"]}
    assert not result["missing"] and result["losses"]["fused"] == result["losses"]["layer by layer"]
    assert any(".mlp.experts.gate_up_proj" in name for name in rows) and any(".mlp.gate." in name for name in rows)
    assert all(r["fused vs layer by layer"] == 0 for r in rows.values())
    assert 1e-3 < max(r["fused vs bf16"] for r in rows.values()) < 0.3
