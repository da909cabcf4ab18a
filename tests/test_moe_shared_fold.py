"""A MoE layer's shared MLP folded into the routed experts' two matrix-vector launches as more pairs
(`moe_gemv.routed_and_shared_experts_gemv`, HF_DEEPSEEK_FOLD_SHARED_EXPERTS=1): its torch path against a float64
recomputation of the layer (routed experts plus the shared MLP), and a model's decode through it against the
default path. The Triton kernels themselves: `benchmarks/triton_interpreter_check.py` (section shared_pairs) and
the GPU test below."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import moe_gemv
from hf_deepseek.modeling import moe_decode
from hf_deepseek.modeling.fp8 import FP8InferenceExperts, FP8InferenceLinear
from hf_deepseek.modeling.moe import DeepSeekMoE


def moe_layer(device: str, dtype: torch.dtype, n_shared: int = 2) -> DeepSeekMoE:
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=n_shared)
    layer = DeepSeekMoE(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return layer


def float64_layer(layer: DeepSeekMoE, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k expert_k(x) + shared(x), every product in float64."""
    gate_up, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
    inter = down.shape[-1]
    xd = x.double()
    out = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for e, w in zip(indices[t].tolist(), weights[t].double(), strict=True):
            h = gate_up[e] @ xd[t]
            out[t] += w * (down[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    shared = layer.shared_experts
    act = torch.nn.functional.silu(xd @ shared.gate_proj.weight.double().T) * (xd @ shared.up_proj.weight.double().T)
    return out + act @ shared.down_proj.weight.double().T


@pytest.mark.parametrize("n_shared", [1, 2])
def test_the_ops_torch_path_is_the_routed_experts_plus_the_shared_mlp(n_shared):
    layer = moe_layer("cpu", torch.float32, n_shared)
    x = torch.randn(3, layer.experts.gate_up_proj.shape[-1])
    with torch.no_grad():
        indices, weights = layer.gate(x, 3)
        shared = layer.shared_experts
        pairs = moe_gemv.routed_and_shared_experts_gemv(
            x, indices, weights, layer.experts.gate_up_proj, layer.experts.down_proj,
            shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight,
        )  # fmt: skip
    assert pairs.shape == (3, 4 + n_shared, x.shape[1]) and pairs.dtype == torch.float32
    torch.testing.assert_close(pairs.sum(dim=1).double(), float64_layer(layer, x, indices, weights),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # the shared slices' products alone are the shared MLP's output
    torch.testing.assert_close(pairs[:, 4:].sum(dim=1), layer.shared_experts(x), rtol=1e-5, atol=1e-6)


def test_the_fold_serves_only_where_the_matrix_vector_kernels_would(monkeypatch):
    """On by default (off with the switch); at most MAX_PAIRS pairs counting the shared slices; never in grad mode
    or on other shared-expert dtypes."""
    layer = moe_layer("cpu", torch.float32)
    x = torch.randn(1, layer.experts.gate_up_proj.shape[-1])
    indices, weights = layer.gate(x, 1)
    monkeypatch.setattr(moe_gemv, "usable", lambda experts, x, pairs: not torch.is_grad_enabled() and pairs <= 32)
    with torch.no_grad():
        monkeypatch.setattr(moe_gemv, "FOLD_SHARED", False)
        assert moe_decode.routed_and_shared_experts(layer, x, indices, weights) is None
        monkeypatch.setattr(moe_gemv, "FOLD_SHARED", True)
        assert moe_decode.routed_and_shared_experts(layer, x, indices, weights) is not None
        many = torch.randn(6, x.shape[1])  # 6 x (4 + 2) = 36 pairs: beyond the kernels
        assert moe_decode.routed_and_shared_experts(layer, many, *layer.gate(many, 6)) is None
        layer.shared_experts.down_proj.to(torch.float64)
        assert moe_decode.routed_and_shared_experts(layer, x, indices, weights) is None
    assert moe_decode.routed_and_shared_experts(moe_layer("cpu", torch.float32), x, indices, weights) is None


def test_model_decode_with_the_shared_mlp_folded_equals_it_in_launches_of_its_own(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2)
    model = DeepSeekForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, 12))
    monkeypatch.setattr(moe_gemv, "usable", lambda experts, x, pairs: pairs <= moe_gemv.MAX_PAIRS)
    monkeypatch.setattr(moe_gemv, "FOLD_SHARED", False)
    apart = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                           output_logits=True, return_dict_in_generate=True)  # fmt: skip
    calls, original = [], moe_gemv.routed_and_shared_experts_gemv
    monkeypatch.setattr(moe_gemv, "FOLD_SHARED", True)
    monkeypatch.setattr(moe_gemv, "routed_and_shared_experts_gemv", lambda *a: calls.append(a[1].shape) or original(*a))
    folded = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                            output_logits=True, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(folded.sequences, apart.sequences)
    torch.testing.assert_close(torch.stack(folded.logits), torch.stack(apart.logits), rtol=1e-4, atol=1e-5)
    assert (1, 4) in calls  # the decode steps' single token went through the op


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4])
def test_triton_kernels_with_the_shared_mlp_match_float64(tokens):
    if not moe_gemv.triton_available():
        pytest.skip("needs Triton and CUDA")
    layer = moe_layer("cuda", torch.bfloat16)
    x = torch.randn(tokens, layer.experts.gate_up_proj.shape[-1], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        indices, weights = layer.gate(x, tokens)
        want = float64_layer(layer, x, indices, weights)
        shared = layer.shared_experts
        out = moe_gemv.routed_and_shared_experts_gemv(
            x, indices, weights, layer.experts.gate_up_proj, layer.experts.down_proj,
            shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight,
        ).sum(dim=1)  # fmt: skip
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < 1e-2, error


def fp8_moe_layer(device: str, n_shared: int = 2) -> DeepSeekMoE:
    """`moe_layer` with FP8 routed experts and an FP8 shared MLP (128x128 block scales; the experts' width 128),
    each weight's rows and columns spread over decades so that every block has a scale of its own."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
                         n_shared_experts=n_shared)  # fmt: skip
    layer = DeepSeekMoE(config).eval()
    with torch.no_grad():
        for p in layer.parameters():
            spread = torch.logspace(-1, 1, p.shape[-2]).view(-1, 1) * torch.logspace(-1, 1, p.shape[-1])
            p.copy_(torch.randn_like(p) * spread[torch.randperm(p.shape[-2])] * p.shape[-1] ** -0.5)
    layer.experts = FP8InferenceExperts.from_experts(layer.experts, config)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(layer.shared_experts, name, FP8InferenceLinear.from_linear(getattr(layer.shared_experts, name)))
    return layer.to(device)


def fp8_op_args(layer: DeepSeekMoE) -> list[torch.Tensor]:
    shared = layer.shared_experts
    layers = (shared.gate_proj, shared.up_proj, shared.down_proj)
    return [*layer.experts._fp8_tensors(), *(t for m in layers for t in (m.weight, m.weight_scale_inv))]


def float64_fp8_layer(layer: DeepSeekMoE, x, indices, weights) -> torch.Tensor:
    """The FP8 layer's output in float64 from its exactly dequantised weights (the activation not rounded)."""
    gate_up, down = layer.experts.dequantized_weights()
    names = ("gate_proj", "up_proj", "down_proj")
    shared = {n: getattr(layer.shared_experts, n).dequantized(torch.float32) for n in names}
    plain = SimpleNamespace(experts=SimpleNamespace(gate_up_proj=gate_up, down_proj=down),
                            shared_experts=SimpleNamespace(**shared))  # fmt: skip
    return float64_layer(plain, x, indices, weights)


def test_the_fp8_ops_torch_path_is_the_routed_experts_plus_the_shared_mlp():
    layer = fp8_moe_layer("cpu")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        indices, weights = layer.gate(x, 3)
        got = moe_gemv.routed_and_shared_experts_gemv_fp8(x, indices, weights, *fp8_op_args(layer))
    assert got.shape == (3, 4 + 2, 256) and got.dtype == torch.float32
    want = float64_fp8_layer(layer, x, indices, weights)
    error = ((got.sum(dim=1).double() - want).norm() / want.norm()).item()
    assert error < 1e-2, error  # the activation rounded to bf16, as the kernels store it


def test_the_fp8_fold_serves_fp8_experts_with_an_fp8_shared_mlp_and_equals_the_layer_unfolded(monkeypatch):
    layer = fp8_moe_layer("cpu")
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(moe_gemv, "usable_fp8", lambda experts, x, pairs: pairs <= moe_gemv.MAX_PAIRS)
    monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, weight: x2.shape[0] <= moe_gemv.MAX_LINEAR_ROWS)
    calls, original = [], moe_gemv.routed_and_shared_experts_gemv_fp8
    monkeypatch.setattr(moe_gemv, "routed_and_shared_experts_gemv_fp8", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        monkeypatch.setattr(moe_gemv, "FOLD_SHARED", False)
        apart = layer(x)
        assert not calls
        monkeypatch.setattr(moe_gemv, "FOLD_SHARED", True)
        folded = layer(x)
        assert calls == [1]
        many = torch.randn(6, 1, 256, dtype=torch.bfloat16)  # 6 x (4 + 2) = 36 pairs: beyond the kernels
        layer(many)
        assert calls == [1]
        recipe = layer.experts.fp8_recipe  # without weight-only decoding: the recipe's FP8 GEMMs, not folded
        layer.experts.fp8_recipe = dataclasses.replace(recipe, weight_only_decode=False)
        layer(x)
        assert calls == [1]
    error = ((folded.double() - apart.double()).norm() / apart.double().norm()).item()
    assert error < 1e-2, error  # the shared MLP's activation rounded once instead of its gate and up each


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4])
def test_fp8_triton_kernels_with_the_shared_mlp_match_float64(tokens):
    if not moe_gemv.fp8_kernels_available():
        pytest.skip("needs Triton and a GPU with FP8 conversions")
    layer = fp8_moe_layer("cuda")
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        indices, weights = layer.gate(x, tokens)
        out = moe_gemv.routed_and_shared_experts_gemv_fp8(x, indices, weights, *fp8_op_args(layer)).sum(dim=1)
        torch_path = moe_gemv.routed_and_shared_experts_gemv_fp8(
            x.cpu(), indices.cpu(), weights.cpu(), *(t.cpu() for t in fp8_op_args(layer))
        ).sum(dim=1)
    want = float64_fp8_layer(layer, x, indices, weights)
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < 1e-2, error
    torch.testing.assert_close(out.cpu(), torch_path, rtol=1e-3, atol=1e-3 * torch_path.abs().max().item())
