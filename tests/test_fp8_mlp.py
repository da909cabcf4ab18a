"""The dense MLP's and shared experts' whole FP8 chain in one autograd function (`FP8Recipe.fused_mlp_quantization`,
`fp8_mlp.py`): a training step's loss and every gradient against the layer-by-layer path it replaces (FP8 linears
with gate and up joined, the activation between), in both recipes, and where it does not serve."""

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling import fp8_mlp
from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training
from hf_deepseek.modeling.layers import SwiGLUMLP

ROWWISE = FP8Recipe.named("rowwise", backend="emulated")  # gate and up joined, the weight gradients in bf16
BLOCKWISE = FP8Recipe.named("deepseek", backend="emulated", linear_wgrad="bf16", joined_projections=True)


def step(model, ids):
    """Loss and every parameter's gradient of one training step."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", [ROWWISE, BLOCKWISE], ids=["rowwise", "deepseek"])
def test_fused_mlp_gives_the_layer_by_layer_step_bit_for_bit(monkeypatch, recipe):
    """bf16, eager: every dense MLP and shared experts through the function (counted), the loss and all gradients
    equal to the layer-by-layer path's."""
    torch.manual_seed(0)
    base = DeepSeekForCausalLM(tiny_config(first_k_dense_replace=1, num_hidden_layers=2)).to(torch.bfloat16).train()
    fused = convert_to_fp8_training(copy.deepcopy(base), dataclasses.replace(recipe, fused_mlp_quantization=True))
    layered = convert_to_fp8_training(copy.deepcopy(base), recipe)
    ids = torch.randint(0, base.config.vocab_size, (2, 24))
    calls = []
    apply = fp8_mlp.FP8SwiGLUMLPFunction.apply
    monkeypatch.setattr(fp8_mlp.FP8SwiGLUMLPFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    loss, grads = step(fused, ids)
    # the dense MLP, the MoE layer's shared experts and those of the MTP module's layer
    assert len(calls) == sum(isinstance(m, SwiGLUMLP) for m in fused.modules()) >= 2
    want_loss, want_grads = step(layered, ids)
    assert torch.equal(loss, want_loss) and grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, want_grads[name]), name
    assert grads["model.layers.0.mlp.gate_proj.weight"].abs().sum() > 0


def test_fused_mlp_stays_out_of_evaluation_and_of_weight_copies():
    """Eval mode and no_grad take the layer-by-layer modules (decode keeps its kernels); `cache_weights` too."""
    torch.manual_seed(1)
    base = DeepSeekForCausalLM(tiny_config(first_k_dense_replace=1, num_hidden_layers=2)).to(torch.bfloat16)
    recipe = dataclasses.replace(ROWWISE, fused_mlp_quantization=True)
    model = convert_to_fp8_training(copy.deepcopy(base), recipe)
    mlp, x = model.model.layers[0].mlp, torch.randn(2, 5, base.config.hidden_size, dtype=torch.bfloat16)
    assert mlp.train().gate_proj.swiglu_mlp(mlp, x) is not None
    assert mlp.eval().gate_proj.swiglu_mlp(mlp, x) is None
    with torch.no_grad():
        assert mlp.train().gate_proj.swiglu_mlp(mlp, x) is None
    cached = convert_to_fp8_training(copy.deepcopy(base), dataclasses.replace(recipe, cache_weights=True))
    cached_mlp = cached.model.layers[0].mlp.train()
    assert cached_mlp.gate_proj.swiglu_mlp(cached_mlp, x) is None


def test_fused_mlp_needs_the_bf16_weight_gradient():
    with pytest.raises(ValueError, match="fused_mlp_quantization computes the MLP's weight gradients in bf16"):
        FP8Recipe(fused_mlp_quantization=True, linear_wgrad="fp8")


@pytest.mark.gpu
def test_fused_mlp_on_the_gpu_follows_the_layer_by_layer_step():
    """On a Hopper GPU (the Triton SwiGLU kernels writing FP8 rows, cuBLAS's FP8 GEMMs), eager, dense layers only (no
    routing for a last-bit difference to flip): the loss and every gradient within FP8's rounding noise of the
    layer-by-layer path's (the kernels' exp differs from torch's in the last bits, so a few FP8 roundings differ),
    none zero."""
    torch.manual_seed(2)
    cfg = tiny_config(first_k_dense_replace=2, num_hidden_layers=2, num_nextn_predict_layers=0, hidden_size=256,
                      intermediate_size=512)  # fmt: skip
    base = DeepSeekForCausalLM(cfg).to("cuda", torch.bfloat16).train()
    rowwise = FP8Recipe.named("rowwise")
    fused = convert_to_fp8_training(copy.deepcopy(base), dataclasses.replace(rowwise, fused_mlp_quantization=True))
    layered = convert_to_fp8_training(copy.deepcopy(base), rowwise)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    loss, grads = step(fused, ids)
    want_loss, want_grads = step(layered, ids)
    torch.testing.assert_close(loss, want_loss, rtol=2e-3, atol=0)
    for name, grad in grads.items():
        want = want_grads[name].float()
        assert grad.float().norm() > 0 and (grad.float() - want).norm() <= 0.03 * want.norm(), name
