"""Compiled FP8 training against eager FP8, module by module: which compiled part changes the gradients.

Eager FP8 follows fp32 (tests/test_fp8_compile.py); a compiled FP8 step must then give eager's gradients up to
rounding. Each check runs one forward and backward of a part (the routed experts, a linear layer) eagerly and under
Inductor, on the same inputs, and reports each gradient's relative difference; for a whole small model, how much
farther from a float32 step the compiled gradients are than the eager ones.
`benchmarks/fp8_compile_grad_check.py` runs them all and writes the table; the GPU tests assert on them.
"""

from __future__ import annotations

import contextlib

import torch
import torch._inductor.config

from ..configuration import DeepSeekConfig
from ..modeling.compile_regions import FP8_INDUCTOR_OPTIONS, compile_for_training
from ..modeling.fp8 import FP8Recipe, convert_to_fp8_training, fp8_linear
from ..modeling.model import DeepSeekForCausalLM

# Small, but every FP8 GEMM spans several 128-blocks along M, N and K, and one expert gets no token at all
CHECK_CONFIG = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
    first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
    v_head_dim=32, num_nextn_predict_layers=0, max_position_embeddings=512,
)  # fmt: skip


def relative_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """|got - want| / |want| per name, in float64."""
    return {n: float((got[n].double() - w.double()).norm() / w.double().norm().clamp(min=1e-30))
            for n, w in want.items()}  # fmt: skip


def _compiled(fn, compile_it: bool | str):
    """fn, or fn compiled: True for Inductor with the FP8 options, or the name of another Dynamo backend."""
    if not compile_it:
        return fn
    torch._dynamo.reset()
    if compile_it is not True:
        return torch.compile(fn, backend=compile_it, fullgraph=True)
    return torch.compile(fn, backend="inductor", fullgraph=True, options=dict(FP8_INDUCTOR_OPTIONS))


def expert_gradients(
    recipe: FP8Recipe | None, compile_it: bool | str, device: str = "cuda", tokens: int = 1000
) -> dict:
    """Gradients of x, both expert weights and the routing weights through the FP8 routed experts (recipe None:
    the bf16 ones)."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig(**CHECK_CONFIG)).to(device, torch.bfloat16)
    if recipe is not None:
        convert_to_fp8_training(model, recipe)
    experts = model.model.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, CHECK_CONFIG["hidden_size"], generator=gen).to(device, torch.bfloat16).requires_grad_()
    # experts 0..6 only: expert 7's segment is empty, as an unused expert's is in training
    indices = torch.stack([torch.randperm(7, generator=gen)[:2] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, 2, generator=gen).softmax(-1).to(device).requires_grad_()
    dy = torch.randn(tokens, CHECK_CONFIG["hidden_size"], generator=gen).to(device, torch.bfloat16)
    _compiled(experts.forward, compile_it)(x, indices, weights).backward(dy)
    return {"x": x.grad, "weights": weights.grad, "gate_up_proj": experts.gate_up_proj.grad,
            "down_proj": experts.down_proj.grad}  # fmt: skip


def linear_gradients(recipe: FP8Recipe, compile_it: bool, device: str = "cuda") -> dict:
    """Output and gradients of one FP8 linear layer [640 x 384] -> [640 x 320]."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(640, 384, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(320, 384, generator=gen) / 20).to(device, torch.bfloat16).requires_grad_()
    dy = torch.randn(640, 320, generator=gen).to(device, torch.bfloat16)
    y = _compiled(lambda a, b: fp8_linear(a, b, recipe), compile_it)(x, w)
    y.backward(dy)
    return {"y": y.detach(), "x": x.grad, "weight": w.grad}


def model_gradients(
    recipe: FP8Recipe | None, compile_it: bool, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Loss and every parameter's gradient of one step of a small model (FP8 with a recipe; recipe None: no FP8),
    compiled per block as training is."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig(**CHECK_CONFIG)).to(device, dtype).train()
    if recipe is not None:
        convert_to_fp8_training(model, recipe)
    torch._dynamo.reset()
    patch = contextlib.nullcontext()
    if compile_it:
        compile_for_training(model, fullgraph=True)
        patch = torch._inductor.config.patch(FP8_INDUCTOR_OPTIONS)
    ids = torch.randint(0, CHECK_CONFIG["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(3))
    with patch:
        loss = model(ids.to(device), labels=ids.to(device)).loss
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach().reshape(1), **grads}


def model_excess_error(recipe: FP8Recipe, device: str = "cuda") -> dict[str, float]:
    """Per tensor, how much farther the compiled FP8 step's gradients are from a float32 step's than eager FP8's
    are (positive: compiling made them worse). Not compiled against eager directly: in a whole model, rounding
    that differs by one ulp flips near-tied expert choices, and the gradients of the router and the experts then
    differ by tens of percent between any two correct FP8 (or bf16) steps."""
    reference = model_gradients(None, False, device, torch.float32)
    eager = relative_differences(model_gradients(recipe, False, device), reference)
    compiled = relative_differences(model_gradients(recipe, True, device), reference)
    return {name: compiled[name] - eager[name] for name in reference}


def check_all(recipes: list[str], device: str = "cuda", with_model: bool = True, report=None) -> dict:
    """{part/recipe: {tensor: error}} for every part: the routed experts and a linear layer, the relative
    difference compiled vs eager; the whole model, `model_excess_error`. `report(key, errors)` is called as each
    part finishes."""
    results = {}

    def record(key: str, errors: dict) -> None:
        results[key] = errors
        if report is not None:
            report(key, errors)

    for name in recipes:
        recipe = FP8Recipe.named(name)
        for part, gradients in (("experts", expert_gradients), ("linear", linear_gradients)):
            record(
                f"{part}/{name}",
                relative_differences(gradients(recipe, True, device), gradients(recipe, False, device)),
            )
        if with_model:
            record(f"model-excess/{name}", model_excess_error(recipe, device))
    return results


def worst(differences: dict[str, float], count: int = 5) -> list[tuple[str, float]]:
    return sorted(differences.items(), key=lambda item: -item[1])[:count]
