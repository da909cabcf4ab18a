"""FP8 weights quantised once per optimizer step (`FP8Recipe.cache_weights`, `fp8_weight_cache.py`): training with
the layers' copies computes what quantising in every forward does; a weight changed by anything (an optimizer, a
state_dict, an in-place edit) gets a fresh copy before the next forward, eager or compiled; gradient accumulation
reuses one; the copies stay out of the state_dict and go with `convert_from_fp8_training`; the blockwise recipe's copy
keeps W^T's blocks, which the input gradient reads. On the GPU, TritonAdamW's update that writes the copy gives the
plain update's weight and moments and the quantiser's copy, bit for bit, for both recipes."""

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels.adamw import TritonAdamW
from hf_deepseek.modeling.compile_regions import compile_for_training
from hf_deepseek.modeling.fp8 import FP8Recipe, convert_from_fp8_training, convert_to_fp8_training
from hf_deepseek.modeling.fp8_weight_cache import FP8WeightCopy

ROWWISE = FP8Recipe.named("rowwise", backend="emulated")
CACHED = dataclasses.replace(ROWWISE, cache_weights=True)
RECIPES = ["rowwise", "deepseek"]


def small_model(recipe: FP8Recipe) -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=64, moe_intermediate_size=48, intermediate_size=96)
    return convert_to_fp8_training(DeepSeekForCausalLM(cfg), recipe)


def train(model, optimizer_class, steps: int = 3, accumulate: int = 1) -> list[float]:
    optimizer = optimizer_class(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        for _ in range(accumulate):
            ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=gen)
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def copies_of(model) -> list[FP8WeightCopy]:
    return [c for m in model.modules() for c in getattr(m, "fp8_weight_copies", {}).values()]


@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, TritonAdamW], ids=["torch-adamw", "triton-adamw"])
def test_training_with_weight_copies_computes_what_quantising_every_forward_does(
    monkeypatch, optimizer_class, recipe_name
):
    """Three steps, two micro-batches each: the losses and the final weights equal, bit for bit, those of the layers
    quantising their weights in every forward; each copy is quantised once a step (the optimizer's update leaves it
    stale here, on the CPU), not once a micro-batch; every copy is of the weight as it now is. (Compiled, with the
    forward pre-hook refreshing the copies: test_fp8_compile.py's "rowwise-cached-weights" and
    "deepseek-cached-weights", whose losses equal eager's.)"""
    recipe = FP8Recipe.named(recipe_name, backend="emulated")
    cached, plain = small_model(dataclasses.replace(recipe, cache_weights=True)), small_model(recipe)
    assert len(copies_of(cached)) > 10 and not copies_of(plain)
    fills, fill = [], FP8WeightCopy.fill
    monkeypatch.setattr(FP8WeightCopy, "fill", lambda self, *a: fills.append(1) or fill(self, *a))
    got = train(cached, optimizer_class, accumulate=2)
    assert len(fills) == 3 * len(copies_of(cached))
    want = train(plain, optimizer_class, accumulate=2)
    assert got == want
    for (name, a), b in zip(cached.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), name
    cached(torch.zeros(1, 4, dtype=torch.long))  # a forward makes every copy fresh
    for module in cached.modules():
        for name, weight_copy in getattr(module, "fp8_weight_copies", {}).items():
            assert weight_copy.is_fresh_for(getattr(module, name))
            backend, weight = module.fp8_backend, getattr(module, name).detach()
            q, scale, _ = backend.quantize_weight_and_amax_t(weight)
            assert torch.equal(weight_copy.q.view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(weight_copy.scale, scale)
            assert (weight_copy.q_t is None) == backend.rowwise
            if not backend.rowwise:  # W^T's blocks: W's, transposed, what the input gradient multiplies by
                assert torch.equal(weight_copy.q_t.view(torch.uint8), q.transpose(-1, -2).view(torch.uint8))


def test_a_weight_changed_outside_the_optimizer_gets_a_fresh_copy():
    """An in-place edit and a loaded state_dict change the weights the next forward sees, as without copies; the
    copies are not in the state_dict, and converting back removes them with the hook."""
    cached, plain = small_model(CACHED), small_model(ROWWISE)
    ids = torch.randint(0, cached.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    cached(ids)  # copies made
    for model in (cached, plain):
        with torch.no_grad():
            model.model.layers[1].mlp.experts.gate_up_proj.mul_(1.5)
            model.model.layers[0].self_attn.o_proj.weight.add_(0.01)
    assert torch.equal(cached(ids).logits, plain(ids).logits)
    state = {k: v * 0.9 if v.is_floating_point() else v for k, v in plain.state_dict().items()}
    assert set(state) == set(cached.state_dict())  # no copy among the saved tensors
    cached.load_state_dict(state)
    plain.load_state_dict(state)
    assert torch.equal(cached(ids).logits, plain(ids).logits)
    convert_from_fp8_training(cached)
    assert not copies_of(cached) and not cached._forward_pre_hooks
    assert not any(hasattr(p, "fp8_copy") for p in cached.parameters())


def test_the_blockwise_input_gradient_reads_the_copys_transposed_blocks(monkeypatch):
    """The paper's recipe with copies: the backward takes W^T from the copy (no transposition of W's blocks in the
    step), and the gradients equal those of transposing W's blocks in every backward, bit for bit."""
    from hf_deepseek.modeling.fp8_numerics import EmulatedBackend

    recipe = FP8Recipe.named("deepseek", backend="emulated")
    cached, plain = small_model(dataclasses.replace(recipe, cache_weights=True)), small_model(recipe)
    ids = torch.randint(0, cached.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    prepared, quantize_weight_t = {}, EmulatedBackend.quantize_weight_t

    def spy(self, w, q, scale, given=None):  # records whether W^T came ready, in call order
        prepared[current].append(given is not None)
        return quantize_weight_t(self, w, q, scale, given)

    monkeypatch.setattr(EmulatedBackend, "quantize_weight_t", spy)
    for current, model in (("cached", cached), ("plain", plain)):
        prepared[current] = []
        model(ids, labels=ids).loss.backward()
    fills = len(copies_of(cached))  # each copy made at its first forward, W^T's blocks by transposing W's
    assert prepared["cached"][:fills] == [False] * fills and prepared["cached"][fills:] == [True] * (fills)
    assert prepared["plain"] == [False] * fills
    for (name, a), b in zip(cached.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.gpu
@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("shape", [(8, 704, 2048), (1536, 2048), (96, 1408), (4, 40, 72)])
def test_triton_adamw_writing_the_copy_matches_the_update_then_the_quantiser_on_the_gpu(shape, name):
    """The fused update of an experts' batched weight (with its columns' amaxes, rowwise; W's blocks and W^T's,
    blockwise) and of dense weights: weight and moments as the plain kernel's, the copy as the Hopper quantiser's of
    the new weight, bit for bit, over steps."""
    from hf_deepseek.modeling.fp8 import get_backend

    backend = get_backend(FP8Recipe.named(name), torch.device("cuda"))
    gen = torch.Generator().manual_seed(len(shape))
    start = (torch.randn(shape, generator=gen) * torch.logspace(-2, 1, shape[-2])[:, None]).bfloat16().cuda()
    fused, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    weight_copy = FP8WeightCopy()
    weight_copy.fill(backend, fused)
    fused.fp8_copy = weight_copy
    optimizers = [TritonAdamW([p], lr=1e-2, weight_decay=0.1) for p in (fused, plain)]
    for _ in range(3):
        grad = torch.randn(shape, generator=gen).bfloat16().cuda()
        for p, optimizer in zip((fused, plain), optimizers, strict=True):
            p.grad = grad.clone()
            optimizer.step()
        assert weight_copy.is_fresh_for(fused)  # written by the update itself
        assert torch.equal(fused, plain)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizers[0].state[fused][key], optimizers[1].state[plain][key])
        want = FP8WeightCopy()
        want.fill(backend, plain)
        assert torch.equal(weight_copy.q.view(torch.uint8), want.q.view(torch.uint8))
        assert torch.equal(weight_copy.scale, want.scale)
        assert (weight_copy.amax_t is None) == (want.amax_t is None) == (len(shape) == 2 or name == "deepseek")
        if want.amax_t is not None:
            assert torch.equal(weight_copy.amax_t, want.amax_t)
        if name == "deepseek":
            assert torch.equal(weight_copy.q_t.view(torch.uint8), want.q_t.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("name", RECIPES)
def test_compiled_step_with_weight_copies_on_the_gpu_matches_quantising_every_forward(name):
    """The bench's way: layers compiled with Inductor, TritonAdamW writing the copies; losses as without copies.
    (The Triton quantisers on both sides: Inductor's fused quantisation of the blockwise default need not round a
    division as the copy's kernel does, so the step without copies would not be the same computation.)"""
    recipe = dataclasses.replace(FP8Recipe.named(name), fused_quantization=False)
    results = []
    for cached in (True, False):
        torch.manual_seed(0)
        cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, intermediate_size=192)
        model = convert_to_fp8_training(
            DeepSeekForCausalLM(cfg).cuda().bfloat16(), dataclasses.replace(recipe, cache_weights=cached)
        )
        torch._dynamo.reset()
        compile_for_training(model)
        optimizer = TritonAdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=gen).cuda()
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results.append((losses, copy.deepcopy([p.detach().float().cpu() for p in model.parameters()])))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)
