"""FP8 the DeepSeek way: the quantisers against float64 references, the FP8 linear and grouped experts against
FP32 with bounds derived from E4M3's 3 mantissa bits, the model conversions, and DeepSeek's official FP8 checkpoint
format written by an independent writer (partial 128x128 blocks included). GPU tests check the Hopper backend
against the CPU emulation and exercise bitsandbytes."""

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.modeling.fp8 import (
    EmulatedBackend,
    FP8InferenceExperts,
    FP8InferenceLinear,
    FP8Linear,
    FP8LinearFunction,
    FP8Recipe,
    FP8RoutedExperts,
    convert_from_fp8_training,
    convert_to_fp8_inference,
    convert_to_fp8_training,
    dequantize_blocks,
    dequantize_tiles,
    fp8_linear,
    quantize_blocks,
    quantize_tiles,
)
from hf_deepseek.modeling.fp8_checkpoint import save_fp8_pretrained
from hf_deepseek.modeling.fp8_numerics import column_amax, quantize_rowwise
from hf_deepseek.modeling.moe import RoutedExperts, TopKRouter

EMULATED = FP8Recipe(backend="emulated")
# E4M3 has 3 mantissa bits: a normal value is rounded to within half a unit in the last place, 2^-4 of itself.
# Below 2^-6 (subnormals) the step is 2^-9, so the absolute error there is at most 2^-10 (in units of the scale).
REL_ROUNDING, SUBNORMAL_HALF_STEP = 2.0**-4, 2.0**-10
AMAX_FLOOR = torch.tensor(1e-12, dtype=torch.float32).double()  # the float32 constant the quantisers clamp to


# ---------------------------------------------------------------------------------------------------------------
# Independent float64 references


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (ties to even) of float64 values in [-448, 448]: step 2^(e-3) in binade e >= -6."""
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0**-6)))
    step = torch.exp2(exponent - 3)
    return torch.round(v / step) * step


def reference_scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = (torch.maximum(amax.double(), AMAX_FLOOR) / 448.0).float().double()
    return torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale


def reference_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and per 128 columns, with explicit slicing: (values in E4M3 units [R, K], scales [R, ceil(K/128)])."""
    x = x.double()
    tiles = math.ceil(x.shape[1] / 128)
    scale = torch.stack([reference_scale(x[:, 128 * t : 128 * (t + 1)].abs().amax(1), pow2) for t in range(tiles)], 1)
    full = scale.repeat_interleave(128, dim=1)[:, : x.shape[1]]
    return e4m3_round(x / full), scale


def reference_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block of a 2-D weight, each partial block with its own amax: (values, scales)."""
    w = w.double()
    rows, cols = math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)
    scale = torch.empty(rows, cols, dtype=torch.float64)
    q = torch.empty_like(w)
    for i in range(rows):
        for j in range(cols):
            block = w[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            scale[i, j] = reference_scale(block.abs().amax(), pow2)
            q[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)] = e4m3_round(block / scale[i, j])
    return q, scale


def reference_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = q.double().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)] *= scale[i, j].double()
    return out


def varied(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows whose magnitudes span 1e-3..1e3, so scales and subnormals are exercised."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 3, rows)[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Quantisers


@pytest.mark.parametrize("pow2", [False, True], ids=["fp32-scales", "ue8m0-scales"])
def test_tile_quantiser_matches_float64_reference(pow2):
    x = varied(7, 300, seed=0)  # 300 = 2 full tiles + a partial one, zero-padded to 384
    x[2, 128:256] = 0.0  # an all-zero tile
    x[3, :128] = torch.logspace(-9, 0, 128) * torch.tensor([1.0, -1.0]).repeat(64)  # subnormal codes
    x[3, 128:256] = 1e-13 * torch.randn(128)  # a tile below the floor
    q, scale = quantize_tiles(x, pow2=pow2)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (7, 384) and scale.shape == (7, 3)

    want_q, want_scale = reference_tiles(x, pow2)
    assert torch.equal(scale.double(), want_scale)
    assert torch.equal(q[:, :300].double(), want_q)
    assert not q[:, 300:].float().any()  # padding encodes zeros
    assert scale[2, 1] == AMAX_FLOOR.float() / 448 if not pow2 else torch.log2(scale[2, 1]) == -48
    assert scale[3, 1] == scale[2, 1] and not q[2, 128:256].float().any()
    assert (q[3, :128].float().abs() < 2.0**-6).sum() > 10  # the small end of the logspace tile is subnormal

    err = (dequantize_tiles(q, scale)[:, :300].double() - x.double()).abs()
    tile_scale = scale.double().repeat_interleave(128, 1)[:, :300]
    assert (err <= REL_ROUNDING * x.double().abs() + SUBNORMAL_HALF_STEP * tile_scale).all()
    if pow2:
        assert torch.equal(torch.log2(scale), torch.log2(scale).round())
        amax = x.abs().unflatten(1, (-1, 100)).amax(-1)  # any partition shows scales bound |x| / 448 from above
        assert (scale.repeat_interleave(128, 1)[:, :300] * 448 >= x.abs()).all() and amax.max() > 0


def test_block_quantiser_matches_float64_reference_with_partial_blocks():
    w = varied(136, 160, seed=1)  # grid [2, 2]: blocks of 128 and 8 rows, 128 and 32 columns
    w[128:, 128:] = 0.0  # the partial corner block is all zero
    q, scale = quantize_blocks(w)
    want_q, want_scale = reference_blocks(w)
    assert q.shape == (136, 160) and scale.shape == (2, 2)
    assert torch.equal(scale.double(), want_scale) and torch.equal(q.double(), want_q)
    assert scale[1, 1] == AMAX_FLOOR.float() / 448 and not q[128:, 128:].float().any()

    experts = torch.randn(3, 200, 130, generator=torch.Generator().manual_seed(2))
    q3, scale3 = quantize_blocks(experts, pow2=True)
    assert scale3.shape == (3, 2, 2)
    for e in range(3):
        want_q, want_scale = reference_blocks(experts[e], pow2=True)
        assert torch.equal(scale3[e].double(), want_scale) and torch.equal(q3[e].double(), want_q)


@pytest.mark.parametrize("shape", [(576, 7168), (136, 160)], ids=["kv_a_proj_576x7168", "136x160"])
def test_dequantisation_uses_128_blocks_not_the_scale_grid(shape):
    """The last, partial block keeps its own scale: 64 rows in [576, 7168] (grid [5, 56]), 8 rows in [136, 160].
    Deriving the block from the grid (576/5 is not an integer; 136/2 = 68 rows) would be wrong."""
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    grid = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    scale = torch.exp2(torch.randint(-8, 8, grid, generator=gen).float())  # very different scale per block
    got = dequantize_blocks(q, scale)
    assert torch.equal(got.double(), reference_dequant(q, scale))
    assert torch.equal(got[100], q[100].float() * scale[0].repeat_interleave(128)[: shape[1]])  # not scale[1]
    with pytest.raises(ValueError, match="scale grid"):
        dequantize_blocks(q, scale[:-1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected(bad):
    x = torch.randn(4, 200)
    x[1, 150] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_tiles(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_blocks(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        fp8_linear(x, torch.randn(8, 200), EMULATED)


# ---------------------------------------------------------------------------------------------------------------
# FP8 linear and grouped experts


def quantisation_error(x: torch.Tensor, q_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(elementwise error bound e = 2^-4 |x| + 2^-10 scale, measured RMS relative error) of one operand."""
    q, scale = q_fn(x)
    x64 = x.double()
    if q_fn is quantize_tiles:
        deq, full = dequantize_tiles(q, scale)[..., : x.shape[-1]], scale.repeat_interleave(128, -1)[..., : x.shape[-1]]
    else:
        deq, full = dequantize_blocks(q, scale), scale.repeat_interleave(128, -2).repeat_interleave(128, -1)
        full = full[: x.shape[0], : x.shape[1]]
    bound = REL_ROUNDING * x64.abs() + SUBNORMAL_HALF_STEP * full.double()
    return bound, (deq.double() - x64).norm() / x64.norm()


def check_product(got, a, b, a_fn, b_fn):
    """got ~ a @ b^T where a is quantised by a_fn along its last dim and b by b_fn (a [M, K], b [N, K]).

    Elementwise: |got - ab| <= e_a |b| + |a| e_b + e_a e_b (+ FP32 accumulation), the worst case of the
    per-operand bounds. Statistically: independent rounding errors add in quadrature, so the relative Frobenius
    error is sqrt(r_a^2 + r_b^2) from the operands' own RMS relative errors (about 2.6% each for Gaussian data,
    3.7% together); the check allows 25% either way, which also catches a path that skipped quantisation."""
    exact = a.double() @ b.double().T
    e_a, r_a = quantisation_error(a, a_fn)
    e_b, r_b = quantisation_error(b, b_fn)
    a_abs, b_abs = a.double().abs(), b.double().abs()
    bound = e_a @ b_abs.T + a_abs @ e_b.T + e_a @ e_b.T
    bound += a.shape[1] * 2.0**-24 * (a_abs + e_a) @ (b_abs + e_b).T  # FP32 accumulation of K products
    assert ((got.double() - exact).abs() <= bound).all()
    rel, predicted = (got.double() - exact).norm() / exact.norm(), math.hypot(r_a, r_b)
    assert 0.75 * predicted < rel < 1.25 * predicted, (rel, predicted)
    return rel


def test_fp8_linear_forward_and_gradients_are_bounded_against_fp32():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(96, 320, generator=gen, requires_grad=True)  # K = 320: two full tiles and a partial one
    w = (torch.randn(200, 320, generator=gen) / 18).requires_grad_(True)  # partial blocks in both dimensions
    dy = torch.randn(96, 200, generator=gen)
    y = fp8_linear(x, w, EMULATED)
    y.backward(dy)
    # forward: x per 1x128 tile along K, w per 128x128 block
    check_product(y, x.detach(), w.detach(), quantize_tiles, quantize_blocks)
    # input gradient dy @ w: dy per 1x128 tile along N, w^T by the same blocks
    check_product(x.grad, dy, w.detach().T.contiguous(), quantize_tiles, quantize_blocks)
    # weight gradient dy^T @ x: both per 1x128 tile along the tokens
    check_product(w.grad, dy.T.contiguous(), x.detach().T.contiguous(), quantize_tiles, quantize_tiles)


@pytest.mark.parametrize("scaling", ["blockwise", "rowwise"])
def test_high_precision_linear_weight_gradient_keeps_the_fp8_forward_and_input_gradient(scaling):
    """linear_wgrad="bf16": the weight gradient is dy^T x in the inputs' precision (float64 here, against a float64
    recomputation), while the output and the input gradient are the FP8 recipe's, bit for bit."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(96, 320, generator=gen, dtype=torch.float64)
    w = torch.randn(200, 320, generator=gen, dtype=torch.float64) / 18
    dy = torch.randn(96, 200, generator=gen, dtype=torch.float64)
    results = {}
    for wgrad in ("fp8", "bf16"):
        recipe = FP8Recipe(backend="emulated", scaling=scaling, linear_wgrad=wgrad)
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fp8_linear(xs, ws, recipe)
        y.backward(dy)
        results[wgrad] = (y.detach(), xs.grad, ws.grad)
    assert torch.equal(results["bf16"][0], results["fp8"][0]) and torch.equal(results["bf16"][1], results["fp8"][1])
    exact = dy.T @ x
    assert torch.allclose(results["bf16"][2], exact, rtol=1e-12, atol=1e-12)
    fp8_error = (results["fp8"][2] - exact).norm() / exact.norm()
    assert 1e-3 < fp8_error < 0.1  # the FP8 weight gradient carries E4M3's rounding; the high-precision one none
    with pytest.raises(ValueError, match="FP8Recipe.linear_wgrad must be one of fp8, bf16, got 'fp16'"):
        FP8Recipe(linear_wgrad="fp16")


def test_fbgemms_grouped_gemms_are_asked_for_by_name_and_found_only_on_a_hopper_gpu():
    """`FP8Recipe(grouped_gemm=)` names torch, fbgemm or deep_gemm (`grouped_wgrad_gemm=` for the weight gradient
    apart); without a CUDA device FBGEMM's kernels are not found, and the emulated backend never takes them."""
    from hf_deepseek.kernels import fbgemm_grouped
    from hf_deepseek.modeling.fp8 import get_backend

    choices = "torch, fbgemm, deep_gemm"
    with pytest.raises(ValueError, match=f"FP8Recipe.grouped_gemm must be one of {choices}, got 'cutlass'"):
        FP8Recipe(grouped_gemm="cutlass")
    with pytest.raises(ValueError, match="FP8Recipe.grouped_wgrad_gemm must be one of auto, torch, fbgemm, got 'x'"):
        FP8Recipe(grouped_wgrad_gemm="x")
    recipe = FP8Recipe.named("rowwise", grouped_gemm="fbgemm")
    assert FP8Recipe().grouped_gemm == "torch" and get_backend(recipe, torch.device("cpu")).fbgemm is False
    assert get_backend(recipe, torch.device("cpu")).fbgemm_wgrad is False
    if not torch.cuda.is_available():
        assert fbgemm_grouped.available() is False


@pytest.mark.gpu
def test_the_weight_gradients_grouped_kernel_is_chosen_apart_from_the_products_on_a_hopper_gpu():
    """The rowwise recipe (`grouped_wgrad_gemm="torch"`) keeps FBGEMM's FP8 products and takes torch's kernel for
    the bf16 weight gradient; "auto" follows `grouped_gemm`."""
    from hf_deepseek.kernels import fbgemm_grouped
    from hf_deepseek.modeling.fp8 import get_backend

    if not fbgemm_grouped.available():
        pytest.skip("needs the fbgemm-gpu-genai wheel on a Hopper GPU")
    device = torch.device("cuda")
    torch_wgrad = get_backend(FP8Recipe.named("rowwise"), device)
    assert torch_wgrad.fbgemm and not torch_wgrad.fbgemm_wgrad
    auto = get_backend(FP8Recipe.named("rowwise", grouped_wgrad_gemm="auto"), device)
    assert auto.fbgemm and auto.fbgemm_wgrad


def test_emulation_multiplies_exactly_the_quantised_operands():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(40, 256, generator=gen), torch.randn(136, 256, generator=gen)
    (x_q, x_s), (w_q, w_s) = quantize_tiles(x), quantize_blocks(w)
    a, b = dequantize_tiles(x_q, x_s).double(), dequantize_blocks(w_q, w_s).double()
    fp32_accumulation = 256 * 2.0**-24 * (a.abs() @ b.abs().T)  # the only error left: FP32 sums of 256 products
    assert ((fp8_linear(x, w, EMULATED).double() - a @ b.T).abs() <= fp32_accumulation).all()


class SeparatePasses(EmulatedBackend):
    """The FP8 layers with W^T taking its own amax pass instead of the amaxes of the pass over W's rows."""

    def quantize_weight_and_amax_t(self, w):
        return (*self.quantize_weight(w), None)


class CountingBackend(EmulatedBackend):
    """Counts the transposed quantisations given amaxes, on `given`."""

    given = 0

    def quantize_weight_t(self, w, q, scale, amax=None):
        self.given += amax is not None
        return super().quantize_weight_t(w, q, scale, amax)


@pytest.mark.parametrize("pow2", [False, True])
def test_rowwise_quantisation_from_given_amaxes_is_bit_identical(pow2):
    """The amax of each column, taken while quantising the rows, quantises the transpose exactly as its own pass
    would (a max is exact): activations with padding columns, batched weights, bf16 and fp32."""
    x = varied(70, 200, seed=30)
    w = varied(3 * 40, 72, seed=31).view(3, 40, 72)
    for t in (x, x.to(torch.bfloat16), w, w.to(torch.bfloat16)):
        want = quantize_rowwise(t.transpose(-1, -2), pow2)
        got = quantize_rowwise(t.transpose(-1, -2), pow2, amax=column_amax(t))
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("linear_wgrad", ["fp8", "bf16"])
def test_rowwise_layers_passing_amaxes_on_equal_separate_passes(linear_wgrad):
    """The rowwise FP8 linear layer and routed experts give the same outputs and gradients, bit for bit, whether
    W^T of the input gradient takes the amaxes of the pass over W's rows or takes its own; and it does take them."""
    recipe = FP8Recipe(scaling="rowwise", backend="emulated", linear_wgrad=linear_wgrad)
    gen = torch.Generator().manual_seed(32)
    x = (torch.randn(37, 200, generator=gen) * torch.logspace(-2, 2, 200)).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(72, 200, generator=gen) / 14).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(37, 72, generator=gen).to(torch.bfloat16)
    counting, separate = CountingBackend(recipe), SeparatePasses(recipe)
    results = []
    for backend in (counting, separate):
        y = FP8LinearFunction.apply(x, w, backend, torch.bfloat16)
        results.append((y, *torch.autograd.grad(y, [x, w], dy)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    assert counting.given == 1  # W^T, from the pass over W's rows

    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=48)
    torch.manual_seed(33)
    experts = RoutedExperts(cfg).to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    convert_to_fp8_training(experts, recipe)
    tokens = torch.randn(300, cfg.hidden_size).to(torch.bfloat16).requires_grad_(True)
    indices = torch.stack([torch.randperm(4)[:2] for _ in range(300)])
    weights = torch.rand(300, 2)
    results, counting.given = [], 0
    for backend in (counting, separate):
        experts.fp8_backend = backend
        out = experts(tokens, indices, weights)
        results.append((out, *torch.autograd.grad(out, [tokens, experts.gate_up_proj, experts.down_proj], out)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    assert counting.given == 2  # both projections' W^T


def fp8_experts_loop(experts: RoutedExperts, x, indices, weights):
    """The routed experts written with one FP8 linear per expert, in token order within each expert."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if token.numel():
            gate, up = fp8_linear(x[token], experts.gate_up_proj[e], EMULATED).chunk(2, -1)
            y = fp8_linear(experts.act_fn(gate) * up, experts.down_proj[e], EMULATED)
            out = out.index_add(0, token, y * weights[token, slot, None])
    return out


def test_grouped_fp8_experts_equal_one_fp8_linear_per_expert():
    """The 128-aligned grouped layout tiles every expert's tokens exactly as a per-expert FP8 linear would."""
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=48)
    torch.manual_seed(6)
    experts = RoutedExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(300, cfg.hidden_size, requires_grad=True)  # ~150 rows per expert: partial token tiles
    indices = torch.stack([torch.randperm(4)[:2] for _ in range(300)])
    weights = torch.rand(300, 2)
    dy = torch.randn(300, cfg.hidden_size)

    want = fp8_experts_loop(experts, x, indices, weights)
    grads_want = torch.autograd.grad(want, [x, experts.gate_up_proj, experts.down_proj], dy)
    convert_to_fp8_training(experts, FP8Recipe(backend="emulated", grouped_wgrad="fp8"))
    assert isinstance(experts, FP8RoutedExperts)
    got = experts(x, indices, weights)
    grads_got = torch.autograd.grad(got, [x, experts.gate_up_proj, experts.down_proj], dy)
    # the same FP8 values and scales; only fp32 accumulation order differs (one GEMM per expert against the grouped
    # one, which depends on the CPU's kernels): up to ~5e-6 here, where FP8 rounding itself moves these values and
    # gradients by up to ~1 against the unquantised experts, so a different tiling could not pass
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "recipe",
    [
        FP8Recipe(backend="emulated"),
        FP8Recipe(backend="emulated", grouped_wgrad="fp8"),
        FP8Recipe(scaling="rowwise", backend="emulated"),
    ],
    ids=["deepseek", "deepseek-fp8-wgrad", "rowwise"],
)
def test_tokens_quantised_once_equal_the_laid_out_rows_quantised(recipe):
    """`quantize_tokens_once` (the default: each token's row quantised once, its FP8 row laid out per chosen expert)
    computes exactly what laying the bf16 rows out and quantising them does: output and every gradient, bit for bit,
    with an idle expert and tokens choosing the same expert twice over the layout's padding rows."""
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=48)
    torch.manual_seed(9)
    experts = RoutedExperts(cfg).to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(300, cfg.hidden_size).to(torch.bfloat16).requires_grad_(True)
    indices = torch.stack([torch.randperm(3)[:2] for _ in range(300)])  # expert 3 idle
    weights, dy = torch.rand(300, 2), torch.randn(300, cfg.hidden_size).to(torch.bfloat16)
    results = {}
    for once in (False, True):
        module = convert_to_fp8_training(copy.deepcopy(experts), dataclasses.replace(recipe, quantize_tokens_once=once))
        out = module(x, indices, weights)
        results[once] = (out, *torch.autograd.grad(out, [x, module.gate_up_proj, module.down_proj], dy))
    for got, want in zip(results[True], results[False], strict=True):
        assert torch.equal(got, want)
    assert results[True][1].abs().sum() > 0 and not results[True][2][3].any()


@pytest.mark.parametrize("fast", [("output", "grad_input", "grad_weight"), ("output",), ()])
def test_fast_accumulation_reaches_the_gemms_the_recipe_names(monkeypatch, fast):
    """`FP8Recipe.fast_accum`: each GEMM of an FP8 linear layer (forward, input and weight gradient) and of the routed
    experts (forward and input gradient) asks the backend for fast accumulation exactly where the recipe names it;
    the emulation's results do not depend on it. Unknown names are refused."""
    calls = []
    gemm, grouped = EmulatedBackend.gemm, EmulatedBackend.grouped_gemm
    monkeypatch.setattr(
        EmulatedBackend, "gemm", lambda self, *a: calls.append(("gemm", a[6] if len(a) > 6 else True)) or gemm(self, *a)
    )
    monkeypatch.setattr(
        EmulatedBackend, "grouped_gemm",
        lambda self, *a: calls.append(("grouped", a[6] if len(a) > 6 else True)) or grouped(self, *a),
    )  # fmt: skip
    recipe = FP8Recipe(scaling="rowwise", backend="emulated", fast_accum=fast)
    x, w = torch.randn(32, 256, requires_grad=True), torch.randn(64, 256, requires_grad=True)
    fp8_linear(x, w, recipe).sum().backward()
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=48)
    experts = convert_to_fp8_training(RoutedExperts(cfg), recipe)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    tokens = torch.randn(40, cfg.hidden_size, requires_grad=True)
    experts(tokens, torch.stack([torch.randperm(4)[:2] for _ in range(40)]), torch.rand(40, 2)).sum().backward()
    want = [("gemm", "output" in fast), ("gemm", "grad_input" in fast), ("gemm", "grad_weight" in fast)]
    want += [("grouped", "output" in fast)] * 2 + [("grouped", "grad_input" in fast)] * 2  # gate_up, down each
    assert sorted(calls) == sorted(want)
    with pytest.raises(ValueError, match="fast_accum names output, grad_input and grad_weight only"):
        FP8Recipe(fast_accum=("weights",))


@pytest.mark.parametrize("kept", [("gate_up_proj", "down_proj"), ("down_proj",)])
def test_expert_projections_kept_in_high_precision(kept):
    """`grouped_bf16` names projections that skip FP8: with both kept the FP8 experts compute exactly what the plain
    experts do (values and gradients); with the down projection kept, they match a model whose gate-up projection
    alone is quantised."""
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=48)
    torch.manual_seed(7)
    experts = RoutedExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(300, cfg.hidden_size, requires_grad=True)
    indices = torch.stack([torch.randperm(3)[:2] for _ in range(300)])  # expert 3 idle: an empty segment
    weights, dy = torch.rand(300, 2), torch.randn(300, cfg.hidden_size)
    params = [x, experts.gate_up_proj, experts.down_proj]

    want = experts(x, indices, weights)
    grads_want = torch.autograd.grad(want, params, dy)
    convert_to_fp8_training(experts, FP8Recipe(backend="emulated", grouped_bf16=kept))
    got = experts(x, indices, weights)
    grads_got = torch.autograd.grad(got, params, dy)
    if len(kept) == 2:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads_got, grads_want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    else:  # FP8 on the gate-up projection only: its rounding, no more
        assert 1e-4 < (got - want).norm() / want.norm() < 0.1
        for g, w in zip(grads_got, grads_want, strict=True):
            assert (g - w).norm() / w.norm() < 0.1
    with pytest.raises(ValueError, match="gate_up_proj and down_proj only"):
        FP8Recipe(grouped_bf16=("up_proj",))


# ---------------------------------------------------------------------------------------------------------------
# Conversions


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1)-scale weights (fan-in scaled), so that quantisation errors are not hidden by tiny activations."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def test_convert_to_fp8_training_swaps_the_linear_layers_and_trains():
    torch.manual_seed(7)
    model = DeepSeekForCausalLM(tiny_config())
    randomize(model, seed=8)
    params = dict(model.named_parameters())
    ids = torch.randint(0, 97, (2, 24))
    reference = model(ids, labels=ids).loss

    convert_to_fp8_training(model, EMULATED)
    assert dict(model.named_parameters()) == params  # same Parameter objects: optimizers are unaffected
    kinds = {name: type(m) for name, m in model.named_modules()}
    fp8_layers = {name for name, kind in kinds.items() if kind is FP8Linear}
    expected = {n for n, m in kinds.items() if m is FP8Linear or n.endswith(("_proj", "eh_proj"))} - {"lm_head"}
    assert fp8_layers == {n for n in expected if kinds[n] is not FP8RoutedExperts}
    assert any(n.endswith("self_attn.kv_b_proj") for n in fp8_layers)  # attention projections
    assert any(n.endswith("mlp.down_proj") and "shared" not in n for n in fp8_layers)  # dense MLP
    assert any("shared_experts" in n for n in fp8_layers) and any(n.endswith("eh_proj") for n in fp8_layers)
    assert all(kinds[n] is FP8RoutedExperts for n in kinds if n.endswith("mlp.experts"))
    assert kinds["lm_head"] is torch.nn.Linear and all(isinstance(r, TopKRouter) for r in model.routers())

    loss = model(ids, labels=ids).loss
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]

    convert_from_fp8_training(model)
    assert not any(isinstance(m, (FP8Linear, FP8RoutedExperts)) for m in model.modules())


def test_fp8_inference_model_generates_through_the_absorbed_cache():
    torch.manual_seed(9)
    # every expert active, so that routing decisions (discontinuous) do not flip under FP8 rounding
    model = DeepSeekForCausalLM(tiny_config(n_routed_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1))
    randomize(model, seed=10)
    model.eval()
    fp8_model = convert_to_fp8_inference(copy.deepcopy(model), EMULATED)
    assert fp8_model.config.quantization_config["weight_block_size"] == [128, 128]
    assert isinstance(fp8_model.model.layers[0].self_attn.kv_b_proj, FP8InferenceLinear)
    assert isinstance(fp8_model.model.layers[1].mlp.experts, FP8InferenceExperts)
    assert not isinstance(fp8_model.lm_head, FP8InferenceLinear)

    attn = fp8_model.model.layers[1].self_attn  # decode folds kv_b_proj's dequantised weight into q and the output
    kv_b = attn.kv_b_proj
    dense = dequantize_blocks(kv_b.weight, kv_b.weight_scale_inv)
    torch.testing.assert_close(attn.dense_kv_b_weight().flatten(0, 1), dense)
    assert attn.dense_kv_b_weight() is attn.dense_kv_b_weight()  # computed once per weight version, then cached

    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want, got = model(ids).logits, fp8_model(ids).logits
        # each E4M3 GEMM adds ~3.7% relative error (see the linear test); some fifteen in sequence through three
        # O(1)-scale layers compound to ~20%
        assert (got - want).norm() / want.norm() < 0.3
        prefill = fp8_model(ids[:, :12], use_cache=True)
        step = fp8_model(ids[:, 12:13], past_key_values=prefill.past_key_values, use_cache=True).logits[:, -1]
        full = fp8_model(ids[:, :13]).logits[:, -1]
        # decode folds kv_b_proj's dequantised weight in, the expanded path also quantises the latent per 1x128
        # tile: one E4M3 rounding apart (~4%), amplified by the O(1)-scale layers above
        assert (step - full).norm() / full.norm() < 0.15
    out = fp8_model.generate(ids[:, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    assert out.shape == (2, 14)


# ---------------------------------------------------------------------------------------------------------------
# Official FP8 checkpoints, written here independently of the model's own code


OFFICIAL = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=100, hidden_size=160,
    intermediate_size=200, moe_intermediate_size=128, num_hidden_layers=2, num_nextn_predict_layers=1,
    num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=4,
    routed_scaling_factor=2.5, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=96, kv_lora_rank=120,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, hidden_act="silu", max_position_embeddings=256,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    torch_dtype="bfloat16", quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                 "weight_block_size": [128, 128]},
)  # fmt: skip


def official_shapes(c: dict) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Official tensor names -> (shape, stored in FP8), from DeepSeek-V3's published layout."""
    d, heads = c["hidden_size"], c["num_attention_heads"]
    qk, r = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["kv_lora_rank"]
    shapes = {"model.embed_tokens.weight": ((c["vocab_size"], d), False), "model.norm.weight": ((d,), False),
              "lm_head.weight": ((c["vocab_size"], d), False)}  # fmt: skip
    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": ((d,), False), p + "post_attention_layernorm.weight": ((d,), False),
            p + "self_attn.q_a_proj.weight": ((c["q_lora_rank"], d), True),
            p + "self_attn.q_a_layernorm.weight": ((c["q_lora_rank"],), False),
            p + "self_attn.q_b_proj.weight": ((heads * qk, c["q_lora_rank"]), True),
            p + "self_attn.kv_a_proj_with_mqa.weight": ((r + c["qk_rope_head_dim"], d), True),
            p + "self_attn.kv_a_layernorm.weight": ((r,), False),
            p + "self_attn.kv_b_proj.weight": ((heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), r), True),
            p + "self_attn.o_proj.weight": ((d, heads * c["v_head_dim"]), True),
        }  # fmt: skip
        if i < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            shapes |= {p + f"mlp.{n}_proj.weight": ((inter, d), True) for n in ("gate", "up")}
            shapes[p + "mlp.down_proj.weight"] = ((d, inter), True)
        else:
            inter = c["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = ((c["n_routed_experts"], d), False)
            shapes[p + "mlp.gate.e_score_correction_bias"] = ((c["n_routed_experts"],), False)
            for m in [f"experts.{e}" for e in range(c["n_routed_experts"])] + ["shared_experts"]:
                size = inter * (c["n_shared_experts"] if m == "shared_experts" else 1)
                shapes |= {p + f"mlp.{m}.{n}_proj.weight": ((size, d), True) for n in ("gate", "up")}
                shapes[p + f"mlp.{m}.down_proj.weight"] = ((d, size), True)
        if i >= c["num_hidden_layers"]:
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                shapes[p + norm + ".weight"] = ((d,), False)
            shapes[p + "eh_proj.weight"] = ((d, 2 * d), True)
    return shapes


def write_official_fp8_checkpoint(directory, seed: int) -> dict[str, torch.Tensor]:
    """Random weights quantised by the float64 reference above, in DeepSeek's file layout. Returns the exact
    dequantised values (float64) under the official names."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    for name, (shape, fp8) in official_shapes(OFFICIAL).items():
        if name.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            value = 0.05 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        if fp8:
            q, scale = reference_blocks(value)
            tensors[name], tensors[name + "_scale_inv"] = q.to(torch.float8_e4m3fn), scale.float()
            dense[name] = reference_dequant(q, scale.float())
        else:
            dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            tensors[name] = value.to(dtype)
            dense[name] = tensors[name].double()
    mtp = f"model.layers.{OFFICIAL['num_hidden_layers']}."
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(OFFICIAL))
    return dense


def stacked_experts(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official per-expert names -> this model's stacked gate_up_proj [E, 2I, d] and down_proj [E, d, I]."""
    out, experts = {}, OFFICIAL["n_routed_experts"]
    for name, value in dense.items():
        if ".experts." not in name:
            out[name] = value
        elif name.endswith("experts.0.gate_proj.weight"):
            p = name.removesuffix("0.gate_proj.weight")
            out[p + "gate_up_proj"] = torch.stack(
                [
                    torch.cat([dense[f"{p}{e}.gate_proj.weight"], dense[f"{p}{e}.up_proj.weight"]])
                    for e in range(experts)
                ]
            )
            out[p + "down_proj"] = torch.stack([dense[f"{p}{e}.down_proj.weight"] for e in range(experts)])
    return out


@pytest.fixture
def official_fp8(tmp_path):
    dense = write_official_fp8_checkpoint(tmp_path / "official", seed=12)
    reference = DeepSeekForCausalLM(DeepSeekConfig.from_pretrained(tmp_path / "official")).float().eval()
    state = {k: v.float() for k, v in stacked_experts(dense).items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(13))
    return tmp_path, reference, ids


def test_official_fp8_checkpoint_dequantises_exactly_on_cpu(official_fp8):
    tmp_path, reference, ids = official_fp8
    model = DeepSeekForCausalLM.from_pretrained(tmp_path / "official", dtype=torch.float32)
    assert not any(isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)) for m in model.modules())
    assert model.config.quantization_config is None  # what it holds now is no longer FP8
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():  # float64 dequantisation rounded once to float32, every partial block too
        assert torch.equal(ours[name], value), name
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_official_fp8_checkpoint_round_trips_bit_for_bit(official_fp8):
    tmp_path, reference, ids = official_fp8
    keep_fp8 = FineGrainedFP8Config(dequantize=False)
    model = DeepSeekForCausalLM.from_pretrained(
        tmp_path / "official", dtype=torch.float32, quantization_config=keep_fp8
    )
    kv_a = model.model.layers[0].self_attn.kv_a_proj_with_mqa
    assert isinstance(kv_a, FP8InferenceLinear) and kv_a.weight_scale_inv.shape == (2, 2)  # [136, 160]
    with torch.no_grad():  # activations quantised too: ~10 E4M3 GEMMs in sequence, ~3.7% each in quadrature: ~12%
        got, want = model(ids).logits, reference(ids).logits
        assert (got - want).norm() / want.norm() < 0.2

    model.save_pretrained(tmp_path / "resaved")
    original, resaved = (
        load_file(tmp_path / "official" / "model.safetensors"),
        load_file(tmp_path / "resaved" / "model.safetensors"),
    )
    assert resaved.keys() == original.keys()
    for name, value in original.items():
        if value.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
            assert resaved[name].dtype == value.dtype and torch.equal(
                resaved[name].view(torch.uint8), value.view(torch.uint8)
            ), name
        else:
            assert torch.equal(resaved[name].to(value.dtype), value), name
    assert (
        json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
        == OFFICIAL["quantization_config"]
    )
    again = DeepSeekForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32, quantization_config=keep_fp8)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(second[name].view(torch.uint8), value.view(torch.uint8)), name


def test_save_fp8_pretrained_writes_the_official_layout_from_a_trained_model(tmp_path):
    torch.manual_seed(14)
    model = DeepSeekForCausalLM(tiny_config()).eval()
    randomize(model, seed=15)
    save_fp8_pretrained(model, tmp_path / "fp8")
    assert not any(isinstance(m, FP8InferenceLinear) for m in model.modules())  # the source model is untouched
    assert getattr(model.config, "quantization_config", None) is None

    saved = load_file(tmp_path / "fp8" / "model.safetensors")
    assert saved["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert saved["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (1, 1)
    assert saved["model.layers.1.self_attn.q_b_proj.weight_scale_inv"].shape == (1, 1)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in saved)
    for unquantised in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight"):
        assert saved[unquantised].dtype == torch.float32 and unquantised + "_scale_inv" not in saved
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"

    loaded = DeepSeekForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=FineGrainedFP8Config())
    in_memory = convert_to_fp8_inference(copy.deepcopy(model))
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)


def test_the_output_head_in_fp8_too_saves_and_loads_in_fp8(tmp_path):
    """`FP8Recipe(skip=())` quantises the output head as well (the fastest decode, where DeepSeek's checkpoints keep
    it bf16): logits within one more E4M3 rounding of the model with the head in bf16; saved, the head's weight and
    scale load back into an FP8 head, not read as a plain weight, and give the same logits bit for bit."""
    torch.manual_seed(9)
    model = DeepSeekForCausalLM(tiny_config(n_routed_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1))
    randomize(model, seed=10)
    model.eval()
    head_bf16 = convert_to_fp8_inference(copy.deepcopy(model), EMULATED)
    head_fp8 = convert_to_fp8_inference(copy.deepcopy(model), dataclasses.replace(EMULATED, skip=()))
    assert isinstance(head_fp8.lm_head, FP8InferenceLinear) and not isinstance(head_bf16.lm_head, FP8InferenceLinear)
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want, got = head_bf16(ids).logits, head_fp8(ids).logits
        assert 0 < ((got - want).norm() / want.norm()).item() < 0.1  # one E4M3 GEMM more (~4%)
    head_fp8.save_pretrained(tmp_path / "fp8")
    saved = load_file(tmp_path / "fp8" / "model.safetensors")
    assert saved["lm_head.weight"].dtype == torch.float8_e4m3fn and "lm_head.weight_scale_inv" in saved
    loaded = DeepSeekForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=FineGrainedFP8Config())
    assert isinstance(loaded.lm_head, FP8InferenceLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)


# ---------------------------------------------------------------------------------------------------------------
# GPU: the Hopper backend against the emulation, FP8 checkpoints on the GPU, bitsandbytes

gpu = pytest.mark.gpu


def hopper_backend(gemm: str = "auto", pow2: bool = False):
    from hf_deepseek.modeling.fp8_triton import HopperBackend

    return HopperBackend(FP8Recipe(gemm=gemm, pow2_scales=pow2))


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hopper_quantisers_are_bit_identical_to_the_reference(pow2, dtype):
    from hf_deepseek.modeling.fp8_triton import HopperBackend

    hopper, emulated = hopper_backend(pow2=pow2), EmulatedBackend(FP8Recipe(pow2_scales=pow2))
    x = varied(300, 1000, seed=17).to("cuda", dtype)
    for view in (x, x.t()):  # row tiles, and the transposed tiles of the weight gradient
        q, scale = hopper.quantize_rows(view)
        q_ref, scale_ref = emulated.quantize_rows(view)
        rows, cols = q_ref.shape
        assert torch.equal(q[:rows, :cols].view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(scale[:rows], scale_ref) and not q[rows:].float().any()
    w = varied(3 * 200, 330, seed=18).view(3, 200, 330).to("cuda", dtype)
    q, scale = hopper.quantize_weight(w)
    qt, scale_t = hopper.quantize_weight_t(w, q, scale)
    q_ref, scale_ref = quantize_blocks(w, pow2)
    assert torch.equal(q[:, :200, :330].view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
    assert torch.equal(qt.transpose(1, 2).view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(scale_t, scale.transpose(-1, -2))
    bad = torch.full((16, 128), float("nan"), device="cuda")
    assert torch.isinf(hopper.quantize_rows(bad)[1]).all()  # by default no sync: NaN propagates as an inf scale
    with pytest.raises(ValueError, match="NaN or inf"):
        HopperBackend(FP8Recipe(check_finite=True)).quantize_rows(bad)


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hopper_rowwise_quantiser_is_bit_identical_to_the_reference(pow2, dtype):
    """The rowwise recipe's Triton quantiser (outside Inductor's fused path) against `quantize_rowwise` of the
    zero-padded operand: activations, their transposed views (weight-gradient operands), expert weights and the
    transposed expert weights of the input gradient."""
    from hf_deepseek.modeling.fp8_triton import HopperBackend

    hopper = HopperBackend(FP8Recipe(scaling="rowwise", pow2_scales=pow2))
    x, long_rows = varied(300, 1000, seed=20).to("cuda", dtype), varied(40, 2600, seed=22).to("cuda", dtype)
    for view in (x, x.t(), x[:37, :51], long_rows, long_rows.t()):  # rows past one 1024-column chunk, too
        q, scale = hopper.quantize_rows(view, rows_multiple=64)
        rows, cols = q.shape
        q_ref, scale_ref = quantize_rowwise(F.pad(view, (0, cols - view.shape[1], 0, rows - view.shape[0])), pow2)
        assert rows % 64 == 0 and cols % 16 == 0
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
    w = varied(3 * 200, 330, seed=21).view(3, 200, 330).to("cuda", dtype)
    q, scale = hopper.quantize_weight(w)
    qt, scale_t = hopper.quantize_weight_t(w, q, scale)
    for got, got_scale, want in ((q, scale, w), (qt, scale_t, w.transpose(1, 2))):
        q_ref, scale_ref = quantize_rowwise(F.pad(want, (0, got.shape[-1] - want.shape[-1])), pow2)
        assert torch.equal(got.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(got_scale, scale_ref)
    bad = long_rows.clone()
    bad[3, 2000] = float("nan")
    scale = hopper.quantize_rows(bad)[1]
    assert torch.isinf(scale[3]).all() and torch.isfinite(scale[torch.arange(scale.shape[0]) != 3]).all()


@gpu
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_hopper_linear_and_experts_agree_with_the_emulation(gemm):
    """Same quantised operands; the GPU accumulates each 128-element partial sum in the tensor cores' own
    precision before promoting it to FP32, so agreement is to ~1e-3, not bit for bit."""
    hopper, emulated = hopper_backend(gemm), EmulatedBackend(FP8Recipe())
    gen = torch.Generator(device="cuda").manual_seed(19)
    x = torch.randn(512, 768, device="cuda", generator=gen, requires_grad=True)
    w = (torch.randn(1024, 768, device="cuda", generator=gen) / 28).requires_grad_(True)
    dy = torch.randn(512, 1024, device="cuda", generator=gen)
    results = []
    for backend in (hopper, emulated):
        y = FP8LinearFunction.apply(x, w, backend, torch.float32)
        results.append((y, *torch.autograd.grad(y, [x, w], dy)))
    for got, want in zip(*results, strict=True):
        assert (got - want).norm() / want.norm() < 2e-3
    if gemm == "cublas":
        assert hopper.cublas[(False, torch.float32)], hopper.cublas  # the 1x128 x 1x128 weight gradient did

    cfg = tiny_config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2)
    experts = RoutedExperts(cfg).cuda()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.06)
    torch.nn.init.normal_(experts.down_proj, std=0.09)
    tokens = torch.randn(1000, 256, device="cuda", generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(1000)])
    weights = torch.rand(1000, 2, device="cuda")
    results = []
    for recipe in (FP8Recipe(gemm=gemm), EMULATED):
        convert_to_fp8_training(experts, recipe)
        out = experts(tokens, indices, weights)
        results.append((out, *torch.autograd.grad(out, [tokens, experts.gate_up_proj, experts.down_proj], out)))
        convert_from_fp8_training(experts)
    # two GEMMs with the intermediate re-quantised: a ~1e-4 difference next to an E4M3 rounding midpoint moves
    # that element by a whole E4M3 step (6%), so a few such flips dominate the difference here
    for got, want in zip(*results, strict=True):
        assert (got - want).norm() / want.norm() < 1e-2


@gpu
@pytest.mark.parametrize("k_blocks", [17, 22])
def test_hopper_blockwise_gemm_takes_cublas_when_k_is_not_a_multiple_of_four_blocks(k_blocks, monkeypatch):
    """K of 17 or 22 blocks (the input gradient of q_a/kv_a joined, the forward of the shared experts' down): cuBLAS
    with zero blocks appended, never the Triton kernel, and the emulation's product."""
    hopper = hopper_backend("cublas")
    if not hopper.cublas[(True, torch.float32)]:
        pytest.skip("torch._scaled_mm has no blockwise dispatch here")

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton GEMM ran")

    monkeypatch.setattr(hopper, "_triton_gemm", no_triton)
    gen = torch.Generator(device="cuda").manual_seed(k_blocks)
    a = torch.randn(272, k_blocks * 128, device="cuda", generator=gen)
    w = torch.randn(384, k_blocks * 128, device="cuda", generator=gen) / 40
    (a_q, a_s), (w_q, w_s) = hopper.quantize_rows(a), hopper.quantize_weight(w)
    got = hopper.gemm(a_q, a_s, w_q, w_s, True, torch.float32)
    want = EmulatedBackend(FP8Recipe()).gemm(a_q, a_s, w_q, w_s, True, torch.float32)
    assert got.shape == want.shape == (272, 384)
    assert (got - want).norm() / want.norm() < 2e-3


@gpu
@pytest.mark.parametrize("name", ["deepseek", "rowwise", "rowwise-fbgemm"])
def test_hopper_experts_of_both_recipes_agree_with_the_emulation_with_idle_experts(name):
    """The routed experts as the bench trains them (bf16 weights and tokens), with two of eight experts given no
    token, on the GPU against the emulation on the CPU (whose weight gradient is a plain per-block product, not
    torch's grouped GEMM): outputs and every gradient, and an idle expert's weight gradient exactly zero (torch's
    grouped GEMMs write no output for an empty group). rowwise-fbgemm: the rowwise recipe with FBGEMM's grouped
    GEMMs (`FP8Recipe(grouped_gemm="fbgemm")`, the optional wheel)."""
    from hf_deepseek.kernels import fbgemm_grouped

    overrides = {}
    if name == "rowwise-fbgemm":
        if not fbgemm_grouped.available():
            pytest.skip("needs the fbgemm-gpu-genai wheel on a Hopper GPU")
        name, overrides = "rowwise", {"grouped_gemm": "fbgemm"}
    gen = torch.Generator().manual_seed(23)
    cfg = tiny_config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2)
    experts = RoutedExperts(cfg).to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.06)
    torch.nn.init.normal_(experts.down_proj, std=0.09)
    tokens = torch.randn(1000, 256, generator=gen).to(torch.bfloat16)
    indices = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(1000)])  # experts 6 and 7 idle
    weights = torch.rand(1000, 2, generator=gen)
    results = []
    cases = (("cuda", FP8Recipe.named(name, **overrides)), ("cpu", FP8Recipe.named(name, backend="emulated")))
    for device, recipe in cases:
        torch.cuda.empty_cache()  # fresh blocks: stale values would show in an unwritten output
        module = convert_to_fp8_training(copy.deepcopy(experts).to(device), recipe)
        x = tokens.to(device).requires_grad_(True)
        out = module(x, indices.to(device), weights.to(device))
        grads = torch.autograd.grad(out, [x, module.gate_up_proj, module.down_proj], out.float().cos().to(out.dtype))
        results.append([t.float().cpu() for t in (out, *grads)])
    for what, got, want in zip(("output", "d tokens", "d gate_up", "d down"), *results, strict=True):
        assert torch.isfinite(got).all(), what
        assert (got - want).norm() / want.norm() < 2e-2, what
    for grad in results[0][2:]:
        assert not grad[6:].any(), "an idle expert got a weight gradient"


@gpu
def test_fbgemm_rowwise_grouped_gemm_matches_torchs_over_the_segments():
    """FBGEMM's FP8 rowwise grouped GEMM against float64 products of the dequantised operands and against torch's
    `_scaled_grouped_mm` on the same quantised operands, over 128-aligned segments with two idle experts and rows
    past the last segment (not read by either)."""
    from hf_deepseek.kernels import fbgemm_grouped
    from hf_deepseek.modeling.fp8_numerics import expert_layout

    if not fbgemm_grouped.available():
        pytest.skip("needs the fbgemm-gpu-genai wheel on a Hopper GPU")
    gen = torch.Generator().manual_seed(4)
    indices = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(700)]).cuda()
    layout = expert_layout(indices, 8)
    a = torch.randn(layout.rows, 256, generator=gen).cuda()
    b = torch.randn(8, 384, 256, generator=gen).cuda() / 16
    (a_q, a_s), (b_q, b_s) = quantize_rowwise(a), quantize_rowwise(b)
    rows = fbgemm_grouped.segment_rows(layout.seg_start, layout.seg_end)
    got = fbgemm_grouped.rowwise_grouped(a_q, a_s.reshape(-1), b_q, b_s.reshape(8, -1), rows).float()
    want = torch._scaled_grouped_mm(
        a_q, b_q.transpose(-2, -1), a_s.reshape(-1), b_s.reshape(8, -1), offs=layout.seg_end, out_dtype=torch.bfloat16
    ).float()
    end = int(layout.seg_end[-1])
    a64, b64 = a_q.double() * a_s.double(), b_q.double() * b_s.double()
    exact = torch.cat([a64[s:e] @ b64[i].T for i, (s, e) in enumerate(layout.segments())])
    assert got.shape == (layout.rows, 384)
    assert (got[:end] - exact).norm() / exact.norm() < 4e-3  # bf16 output rounding
    assert (got[:end] - want[:end]).norm() / want[:end].norm() < 1e-2


@gpu
def test_official_fp8_checkpoint_runs_in_fp8_on_the_gpu(official_fp8):
    tmp_path, reference, ids = official_fp8
    model = DeepSeekForCausalLM.from_pretrained(tmp_path / "official", dtype=torch.bfloat16, device_map="cuda")
    layer = model.model.layers[1]
    assert layer.self_attn.o_proj.weight.dtype == torch.float8_e4m3fn and layer.self_attn.o_proj.weight.is_cuda
    assert isinstance(layer.mlp.experts, FP8InferenceExperts)
    with torch.no_grad():
        got, want = model(ids.cuda()).logits.float().cpu(), reference(ids).logits
    assert (got - want).norm() / want.norm() < 0.2  # as on the CPU, plus bf16 activations between the GEMMs
    out = model.generate(ids[:, :6].cuda(), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    assert out.shape == (2, 14)


def bnb_model_dir(tmp_path):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(20)
    dims = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, kv_lora_rank=64, q_lora_rank=64)
    heads = dict(num_attention_heads=4, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    every_expert = dict(n_routed_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1)  # no routing flips
    cfg = tiny_config(**dims, **heads, **every_expert)
    model = DeepSeekForCausalLM(cfg)
    randomize(model, seed=21)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    return tmp_path / "bf16", model


@gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantised_loading_generates(tmp_path, bits):
    from transformers import BitsAndBytesConfig

    directory, model = bnb_model_dir(tmp_path)
    quant = (
        BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    )
    quantised = DeepSeekForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cuda:0")
    kv_b = quantised.model.layers[1].self_attn.kv_b_proj
    assert type(kv_b).__module__.startswith("bitsandbytes")
    reference = model.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 97, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(22))
    with torch.no_grad():
        got, want = quantised(ids).logits.float(), reference(ids).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"bitsandbytes {bits}-bit: relative logit error {rel:.3f} against bf16")
    assert rel < (0.15 if bits == 8 else 0.6)  # int8 / nf4 weights through three O(1)-scale layers (H200: 0.06, 0.52)
    out = quantised.generate(ids[:, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    assert out.shape == (2, 14)


class RepeatedBatch(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        row = self.ids[i % len(self.ids)]
        return {"input_ids": row, "labels": row}


@gpu
def test_bitsandbytes_8bit_adamw_trains_the_model(tmp_path):
    """The Trainer (and TRL's trainers, which inherit its `optim` choices) with `optim="adamw_bnb_8bit"`."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import Trainer, TrainingArguments

    directory, _ = bnb_model_dir(tmp_path)
    model = DeepSeekForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda()
    before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    ids = torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(23))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), optim="adamw_bnb_8bit", learning_rate=3e-3, max_steps=12,
        per_device_train_batch_size=4, logging_steps=1, report_to=[], save_strategy="no", warmup_steps=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=RepeatedBatch(ids))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer2State) and optimizer.args.optim_bits == 8
    assert any(
        state.get("state1") is not None and state["state1"].dtype == torch.uint8 for state in optimizer.state.values()
    )
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.7 * losses[0]
    assert not torch.equal(model.model.layers[1].mlp.experts.gate_up_proj.detach(), before)
