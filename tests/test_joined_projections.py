"""`joined_projections` (the rowwise FP8 recipe's, opt-in otherwise): a training step's q_a/kv_a and gate/up
projections as one GEMM each over their joined weights gives the separate projections' loss and gradients (full
precision), takes half the FP8 GEMMs of those pairs with the FP8 error of the separate ones, and compiles without
graph breaks or recompilation."""

import copy
import math

import torch
from conftest import tiny_config
from test_fp8_compile import layer_kinds, recipe_of, train_compiled

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import moe_gemv
from hf_deepseek.modeling import joined_projections
from hf_deepseek.modeling.decode_linear import DecodeLinear, use_decode_linears
from hf_deepseek.modeling.fp8 import FP8Linear, FP8Recipe, convert_to_fp8_training


def loss_and_grads(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_joined_step_gives_the_separate_projections_loss_and_gradients(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, moe_intermediate_size=40, intermediate_size=96, n_shared_experts=2)
    model = DeepSeekForCausalLM(config).train()  # no two joined or routed weights of one shape
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want = loss_and_grads(model, ids)
    config = model.config
    joined_rows = {  # the joined weights' rows: q_a + kv_a, the dense MLP's and the shared experts' gate + up
        config.q_lora_rank + config.kv_lora_rank + config.qk_rope_head_dim: "attention",
        2 * config.intermediate_size: "dense MLP",
        2 * config.moe_intermediate_size * config.n_shared_experts: "shared experts",
    }
    calls = []
    original = torch.nn.functional.linear

    def spy(x, weight, *bias):
        if weight.shape[0] in joined_rows and weight.shape[1] == config.hidden_size:
            calls.append(joined_rows[weight.shape[0]])
        return original(x, weight, *bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    assert calls == []  # separately: no linear of a joined weight's shape
    calls.clear()
    monkeypatch.setattr(joined_projections, "ENABLED", True)
    got = loss_and_grads(model, ids)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    dense = config.first_k_dense_replace
    want_calls = ["attention"] * layers + ["dense MLP"] * dense + ["shared experts"] * (layers - dense)
    assert sorted(calls) == sorted(want_calls)
    assert abs(got[0] - want[0]) < 1e-6 * abs(want[0])
    assert got[1].keys() == want[1].keys()
    assert max(relative(got[1][n], want[1][n]) for n in want[1]) < 1e-5
    calls.clear()
    with torch.no_grad():  # inference: the separate projections, as before
        model(ids)
    assert calls == []


def test_joined_step_still_serves_after_generate_made_the_linears_decode_linears(monkeypatch):
    """generate() turns the model's linears into `DecodeLinear`s (GRPO trains between rollouts): a training step
    then still joins the pairs, with the same loss and gradients."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(hidden_size=64, moe_intermediate_size=40, intermediate_size=96)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want = loss_and_grads(model, ids)
    monkeypatch.setattr(moe_gemv, "LINEAR_GEMV", True)
    assert use_decode_linears(model) > 0
    attn = model.model.layers[0].self_attn
    assert type(attn.q_a_proj) is DecodeLinear and type(attn.kv_a_proj_with_mqa) is DecodeLinear
    monkeypatch.setattr(joined_projections, "ENABLED", True)
    assert joined_projections.joined_projections(attn.q_a_proj, attn.kv_a_proj_with_mqa, torch.randn(3, 64))
    got = loss_and_grads(model, ids)
    assert abs(got[0] - want[0]) < 1e-6 * abs(want[0])
    assert max(relative(got[1][n], want[1][n]) for n in want[1]) < 1e-5


def test_fp8_joined_step_halves_the_pairs_gemms_with_the_separate_error(monkeypatch):
    """The rowwise recipe joins the pairs itself (`FP8Recipe.joined_projections`), with the bf16 switch off."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, num_nextn_predict_layers=0)
    reference = DeepSeekForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    want = loss_and_grads(reference, ids)
    assert not joined_projections.ENABLED and FP8Recipe.named("rowwise").joined_projections
    calls = []
    original = FP8Linear.linear_with_weight
    monkeypatch.setattr(FP8Linear, "linear_with_weight", lambda *a: calls.append(1) or original(*a))
    runs, counts = {}, {}
    for name, joined in (("separate", False), ("joined", True)):
        recipe = FP8Recipe.named("rowwise", backend="emulated", joined_projections=joined)
        model = convert_to_fp8_training(copy.deepcopy(reference), recipe)
        calls.clear()
        runs[name] = loss_and_grads(model, ids)
        counts[name] = len(calls)
    assert counts["joined"] == counts["separate"] - 2 * config.num_hidden_layers  # one GEMM for each pair
    errors = {}
    for name, run in runs.items():
        errors[name] = max(relative(run[1][n], want[1][n]) for n in want[1] if ".experts." not in n)
        assert abs(run[0] - want[0]) < 0.02 * want[0]
    # E4M3 rounding of every GEMM operand: ~4% a product, the same for a row scaled over one output or two
    assert errors["joined"] < 1.5 * errors["separate"] + 0.02, errors


def test_joined_fp8_step_compiles_once_per_layer_kind():
    assert recipe_of("rowwise", backend="emulated").joined_projections
    model, frames, losses = train_compiled(recipe_of("rowwise", backend="emulated"), "cpu", "aot_eager", steps=2)
    assert frames == [layer_kinds(model)] * 2, frames  # fullgraph: no graph break; no recompilation
    assert all(math.isfinite(x) for x in losses)
    torch._dynamo.reset()
