"""The post-attention residual sum and RMSNorm in the router's launch (`moe_routing.add_norm_route_tokens`, on by
default, HF_DEEPSEEK_ROUTER_ADD_NORM=0 turns it off): the op's CPU computation against the decoder layer's own ops and
the router, when it serves, a model's decode through it (eager and compiled, one graph) against the default path; on a
GPU the Triton kernel against the eager ops bit for bit. The kernel also runs in Triton's interpreter on the CPU:
`benchmarks/triton_interpreter_check.py` (section `moe_router`)."""

import pytest
import torch
from conftest import tiny_config
from test_moe_routing import CONFIGS, assert_same_routing, frozen_gate, gpu_ready, router_and_tokens

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import moe_routing
from hf_deepseek.modeling.layers import RMSNorm


def norm_and_rows(dim: int, tokens: int, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    norm = RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.25)
    residual, delta = torch.randn(tokens, dim, dtype=dtype), torch.randn(tokens, dim, dtype=dtype)
    return norm.to(device, dtype), residual.to(device), delta.to(device)


@pytest.mark.parametrize("name", ["v3", "v2-group-limited-softmax", "top-1"])
def test_op_equals_the_layers_sum_norm_and_router(name):
    """CPU: the sum and the normalised rows are the decoder layer's `hidden + attn_out` and its RMSNorm module's
    output, bit for bit; the routing is the router's (as before the kernel) of those rows."""
    router, _ = router_and_tokens(name, 1, hidden=64)
    norm, residual, delta = norm_and_rows(64, 5)
    with torch.no_grad():
        indices, weights, counts, hidden, normed = moe_routing.add_norm_route_tokens(
            residual, delta, norm.weight, norm.eps, router.weight, router.e_score_correction_bias,
            *moe_routing.routing_args(router.config),
        )  # fmt: skip
        want_hidden = residual + delta
        assert torch.equal(hidden, want_hidden) and torch.equal(normed, norm(want_hidden))
        assert_same_routing((indices, weights, counts), frozen_gate(router, norm(want_hidden)))


def test_serves_only_where_the_kernel_computes_the_logits(monkeypatch):
    """On by default, off when switched off; for inference on the kernel's device, at most FUSE_MAX_TOKENS tokens, the
    norm's weight, the residual and its update of one dtype."""
    router, _ = router_and_tokens("v3", 1, hidden=64)
    norm, residual, delta = norm_and_rows(64, moe_routing.FUSE_MAX_TOKENS)
    monkeypatch.setattr(moe_routing, "_kernel_device", lambda x: True)
    with torch.no_grad():
        assert moe_routing.add_norm_usable(router, norm.weight, residual, delta)  # ADD_NORM on by default
        monkeypatch.setattr(moe_routing, "ADD_NORM", False)  # HF_DEEPSEEK_ROUTER_ADD_NORM=0
        assert not moe_routing.add_norm_usable(router, norm.weight, residual, delta)
        monkeypatch.setattr(moe_routing, "ADD_NORM", True)
        more = torch.cat([residual, residual[:1]])
        assert not moe_routing.add_norm_usable(router, norm.weight, more, more)
        assert not moe_routing.add_norm_usable(router, norm.weight.bfloat16(), residual, delta)
        assert not moe_routing.add_norm_usable(router, norm.weight, residual, delta.bfloat16())
    assert not moe_routing.add_norm_usable(router, norm.weight, residual, delta)  # gradients wanted: training
    with pytest.raises(ValueError, match="add_norm needs the kernel's own logits: at most FUSE_MAX_TOKENS=16"):
        args = moe_routing.routing_args(router.config)
        moe_routing.launch(
            more, router.weight, router.e_score_correction_bias, *args, add_norm=(more, norm.weight, 1e-6)
        )


def test_decode_through_the_op_gives_the_default_tokens_in_one_graph(monkeypatch):
    """A four-MoE-layer model's greedy decode with the op standing in for each MoE layer's sum, norm and router (its
    CPU computation) gives the default eager path's tokens, eager and compiled (one graph, no break), and every MoE
    layer of every step takes the op."""
    from test_compiled_decode import compiled_greedy_in_one_graph, four_moe_layer_model, greedy

    model = four_moe_layer_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    default = greedy(model, ids, 8, cache_implementation="dynamic")
    monkeypatch.setattr(moe_routing, "_kernel_device", lambda x: True)  # `usable` as on a GPU
    monkeypatch.setattr(moe_routing, "ADD_NORM", True)
    calls = []
    original = moe_routing.add_norm_reference  # the op's CPU computation: one call per op run
    monkeypatch.setattr(moe_routing, "add_norm_reference", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    assert torch.equal(greedy(model, ids, 8, cache_implementation="dynamic"), default)
    assert calls.count(2) == 4 * 7 and calls.count(10) == 4  # 7 decode steps and the prefill, 4 MoE layers each
    fast = compiled_greedy_in_one_graph(model, ids, 8)
    assert torch.equal(fast, default)


# on a GPU: the Triton kernel


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2, 5, 16])
@pytest.mark.parametrize("name", ["v3", "v2-group-limited-softmax", "groups-of-20"])
def test_kernel_sum_and_norm_match_the_eager_ops_on_gpu(name, tokens):
    """bf16 at the bench's width: the sums equal `residual + delta` bit for bit, the normalised rows RMSNorm's
    output but for rsqrt's last bit (at most 1% of values one bf16 rounding apart), and the routing is torch's of
    the logits of the rows the kernel normalised."""
    gpu_ready()
    router, _ = router_and_tokens(name, 1, "cuda", hidden=2048)
    norm, residual, delta = norm_and_rows(2048, tokens, torch.bfloat16, "cuda", seed=tokens)
    args = moe_routing.routing_args(router.config)
    with torch.no_grad():
        indices, weights, counts, logits, hidden, normed = moe_routing.launch(
            residual, router.weight, router.e_score_correction_bias, *args, add_norm=(delta, norm.weight, norm.eps)
        )
        want_hidden = residual + delta
        want_normed = norm(want_hidden)
        want_indices, want_weights, _ = moe_routing.route_reference(logits, router.e_score_correction_bias, *args)
    assert torch.equal(hidden, want_hidden)
    assert (normed != want_normed).float().mean().item() <= 0.01
    torch.testing.assert_close(normed, want_normed, rtol=2**-7, atol=0)
    torch.testing.assert_close(logits, torch.nn.functional.linear(normed.float(), router.weight), rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, torch.bincount(want_indices.flatten(), minlength=router.num_experts))
    assert not moe_routing._semaphores(residual.device).any()


@pytest.mark.gpu
def test_model_decode_through_the_kernel_gives_the_default_tokens_on_gpu(monkeypatch):
    """A tiny bf16 model's greedy decode (compiled, as generate runs it) with the sum and norm in the router's launch
    gives the default path's tokens."""
    gpu_ready()
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=3, **CONFIGS["v3"])
    model = DeepSeekForCausalLM(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, config.vocab_size, (2, 12), device="cuda")
    monkeypatch.setattr(moe_routing, "ADD_NORM", False)  # the path apart (HF_DEEPSEEK_ROUTER_ADD_NORM=0)
    default = model.generate(ids, max_new_tokens=8, do_sample=False)
    monkeypatch.setattr(moe_routing, "ADD_NORM", True)
    calls = []
    original = moe_routing.add_norm_route_tokens
    monkeypatch.setattr(moe_routing, "add_norm_route_tokens", lambda *a: calls.append(1) or original(*a))
    for compiled in ("_compiled_call", "_fast_decode_step", "_fast_decode_buffers"):  # generate() compiles anew
        model.__dict__.pop(compiled, None)
    torch.compiler.reset()
    fused = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert calls  # the eager prefill's 24 tokens do not take it; the decode steps' 2 tokens do (traced once)
    assert torch.equal(fused, default)
