"""The fused router (`kernels/moe_routing.py`): its torch computation against the router as it was before the kernel
(a frozen copy below) across the routing settings the configs allow, the gate through the op, a compiled decode
through the op as one graph, and on a GPU the Triton kernel against the torch computation on the same logits.
The Triton kernel also runs in Triton's interpreter on the CPU: `benchmarks/triton_interpreter_check.py`."""

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_recorder, tiny_config
from torch._dynamo.utils import counters

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.evals.cuda_graph_timing import graph_time_us
from hf_deepseek.kernels import counters as kernel_counters
from hf_deepseek.kernels import moe_routing
from hf_deepseek.modeling.moe import TopKRouter

# routing settings: V3 (noaux_tc, sigmoid, 8 groups), without normalisation, one group, every group kept, V2
# (group_limited_greedy, softmax), greedy, top-1, groups of one expert, groups of 20 experts (not a power of 2)
CONFIGS = {
    "v3": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4),
    "v3-unnormalised": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, norm_topk_prob=False),
    "one-group": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1),
    "all-groups-kept": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=4),
    "v2-group-limited-softmax": dict(
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
    ),
    "greedy-softmax": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
                           scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0),
    "greedy-sigmoid-grouped-config": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                                          topk_method="greedy"),
    "top-1": dict(n_routed_experts=16, num_experts_per_tok=1, n_group=4, topk_group=2),
    "groups-of-one": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=8, topk_group=4),
    "groups-of-20": dict(n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3),
}  # fmt: skip


def frozen_gate(router: TopKRouter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopKRouter.forward's routing before the kernel (commit f6becb8), verbatim -> indices, weights, counts."""
    cfg = router.config
    logits = F.linear(x.float(), router.weight.float())  # [N, E]
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores.detach() + router.e_score_correction_bias  # [N, E]
    if cfg.topk_method != "greedy" and cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = choice.view(-1, cfg.n_group, router.num_experts // cfg.n_group)  # [N, G, E/G]
        if cfg.topk_method == "group_limited_greedy":  # DeepSeek-V2: a group scores as its best expert
            group_scores = grouped.amax(dim=-1)  # [N, G]
        else:  # noaux_tc (DeepSeek-V3): the sum of its two best experts
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [N, G]
        kept = group_scores.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(-1, router.num_experts)
    indices = choice.topk(router.top_k, dim=-1).indices  # [N, k]
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob and router.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    counts = torch.bincount(indices.flatten(), minlength=router.num_experts)
    return indices, weights, counts


def router_and_tokens(name: str, tokens: int, device="cpu", x_dtype=torch.float32, seed=0, hidden=64):
    torch.manual_seed(seed)
    config = tiny_config(hidden_size=hidden, **CONFIGS[name])
    router = TopKRouter(config).eval()
    with torch.no_grad():
        router.weight.normal_(0, hidden**-0.5)  # logits of about unit size, as a trained router's
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(tokens, hidden, dtype=x_dtype)
    return router.to(device), x.to(device)


def assert_same_routing(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_routing_equals_the_router_before_the_kernel(name, tokens):
    router, x = router_and_tokens(name, tokens)
    with torch.no_grad():
        want = frozen_gate(router, x)
        indices, weights = router(x, batch_size=1)
        assert_same_routing((indices, weights, router.last_expert_load), want)
        args = (x, router.weight, router.e_score_correction_bias, *moe_routing.routing_args(router.config))
        assert_same_routing(moe_routing.route_tokens(*args), want)  # the op's CPU computation
    assert moe_routing.supported(router.config)
    assert not moe_routing.usable(router, x)  # CUDA only


def test_training_router_keeps_its_gradients_and_balance_loss():
    """Autograd (and the sequence-wise balance loss) stay on the torch path, unchanged."""
    router, x = router_and_tokens("v3", 12)
    router.config.aux_loss_alpha = 0.01
    router.train()
    indices, weights = router(x, batch_size=2)
    assert torch.equal(indices, frozen_gate(router, x)[0])
    (weights.sum() + router.last_aux_loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert not moe_routing.usable(router, x.cuda() if torch.cuda.is_available() else x)  # grad mode on


@pytest.mark.parametrize("name", ["v3", "v2-group-limited-softmax", "groups-of-20"])
def test_training_router_chooses_through_the_indices_op(monkeypatch, name):
    """Where `route_indices` serves (CUDA; here its CPU computation), a training router takes its experts from the
    op and its gate weights from torch's scores of the same logits: the routing of the router before the kernel,
    gradients into the router's weight and the balance loss as on the torch path."""
    router, x = router_and_tokens(name, 300, seed=3)
    router.config.aux_loss_alpha = 0.01
    router.train()
    results = {}
    calls, original = [], moe_routing.route_indices
    monkeypatch.setattr(moe_routing, "route_indices", lambda *a: calls.append(a[0].shape) or original(*a))
    for through_op in (False, True):
        monkeypatch.setattr(moe_routing, "routes_indices", lambda router, logits, serves=through_op: serves)
        calls.clear()
        router.weight.grad = None
        indices, weights = router(x, batch_size=2)
        (weights.square().sum() + router.last_aux_loss).backward()
        results[through_op] = (indices, weights.detach(), router.weight.grad.clone(), router.last_aux_loss.detach())
        assert calls == ([(300, router.num_experts)] if through_op else [])
    want = frozen_gate(router, x)
    assert torch.equal(results[True][0], want[0]) and torch.equal(results[True][1], want[1])
    for got, expected in zip(results[True], results[False], strict=True):
        assert torch.equal(got, expected)
    assert results[True][2].abs().sum() > 0


def test_compiled_training_router_through_the_indices_op_is_one_graph(monkeypatch):
    """A training router compiled with the indices op choosing the experts (its CPU computation, traced as on a GPU,
    as the compiled decoder layers trace it): one graph, no graph break, and the eager router's choice, weights,
    balance loss and gradients."""
    router, x = router_and_tokens("v3", 48, seed=4)
    router.config.aux_loss_alpha = 0.01
    router.train()
    monkeypatch.setattr(moe_routing, "_kernel_device", lambda x: True)  # `routes_indices` as on a GPU
    calls, original = [], moe_routing.route_indices
    monkeypatch.setattr(moe_routing, "route_indices", lambda *a: calls.append(1) or original(*a))

    def route(x):
        indices, weights = router(x, batch_size=2)
        return indices, weights, router.last_aux_loss

    def run(fn):
        indices, weights, aux = fn(x)
        grad = torch.autograd.grad(weights.square().sum() + aux, router.weight)[0]
        return indices, weights.detach(), aux.detach(), grad

    eager = run(route)
    torch.compiler.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True, recompile_limit=1):
            compiled = run(torch.compile(route, backend="aot_eager", fullgraph=True))
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch.compiler.reset()
    assert len(calls) == 2  # the eager run and the traced one
    assert torch.equal(compiled[0], eager[0])
    for got, want in zip(compiled[1:], eager[1:], strict=True):
        torch.testing.assert_close(got, want)


def test_gate_takes_the_op_when_it_serves(monkeypatch):
    router, x = router_and_tokens("v3", 5)
    with torch.no_grad():
        want = frozen_gate(router, x)
        monkeypatch.setattr(moe_routing, "usable", lambda router, x: True)
        calls = []
        original = moe_routing.route_tokens
        monkeypatch.setattr(moe_routing, "route_tokens", lambda *a: calls.append(a[0].shape) or original(*a))
        indices, weights = router(x, batch_size=1)
    assert calls == [(5, 64)]
    assert_same_routing((indices, weights, router.last_expert_load), want)
    assert router.last_aux_loss is None


def test_supported_configs():
    assert moe_routing.supported(tiny_config(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4))
    assert not moe_routing.supported(tiny_config(n_routed_experts=1024, num_experts_per_tok=8, n_group=8))
    assert not moe_routing.supported(tiny_config(n_routed_experts=64, num_experts_per_tok=32, n_group=1))


def test_compiled_decode_through_the_op_is_one_graph(monkeypatch):
    """With the op standing in for the router (its CPU computation), generate's compiled decode step is still one
    graph with no graph break (the op is one node: its fake implementation gives the shapes) and gives eager
    greedy's tokens."""
    from test_compiled_decode import compiled_greedy_in_one_graph, four_moe_layer_model, greedy

    model = four_moe_layer_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    eager = greedy(model, ids, 8, cache_implementation="dynamic")
    monkeypatch.setattr(moe_routing, "_kernel_device", lambda x: True)  # `usable` as on a GPU, traced
    calls = []
    original = moe_routing.count_per_expert  # the op's CPU computation counts with it: one call per op run
    monkeypatch.setattr(
        moe_routing, "count_per_expert", lambda flat, n: calls.append(flat.numel()) or original(flat, n)
    )
    fast = compiled_greedy_in_one_graph(model, ids, 8)
    assert torch.equal(fast, eager)
    top_k = model.config.num_experts_per_tok
    assert calls.count(2 * top_k) >= 4 * 6  # 4 MoE layers x the compiled decode steps, 2 tokens each


def test_op_in_an_fx_graph_is_one_node():
    router, x = router_and_tokens("v3", 3)
    backend, graphs = graph_recorder()

    with torch.no_grad():
        args = moe_routing.routing_args(router.config)
        compiled = torch.compile(
            lambda x, w, b: moe_routing.route_tokens(x, w, b, *args), backend=backend, fullgraph=True
        )
        got = compiled(x, router.weight, router.e_score_correction_bias)
    assert_same_routing(got, frozen_gate(router, x))
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("route_tokens" in t for t in targets) == 1, targets


# on a GPU: the Triton kernel


def gpu_ready():
    if not (torch.cuda.is_available() and moe_routing.triton_available()):
        pytest.skip("needs Triton and CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused-gemv", "cublas-logits"])
@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 17, 64, 256])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_matches_the_torch_routing_on_gpu(name, tokens, fuse):
    """From the kernel's own logits, torch's routing picks the same experts in the same order (no exact ties in
    random data), the same counts and weights to the last bits (normalisation sums in another order); the logits
    agree with cuBLAS's fp32 product to rounding."""
    gpu_ready()
    router, x = router_and_tokens(name, tokens, "cuda", torch.bfloat16, seed=tokens, hidden=2048)
    args = moe_routing.routing_args(router.config)
    with torch.no_grad():
        indices, weights, counts, logits = moe_routing.launch(
            x, router.weight, router.e_score_correction_bias, *args, fuse=fuse
        )
        want_logits = F.linear(x.float(), router.weight.float())
        want_indices, want_weights, _ = moe_routing.route_reference(logits, router.e_score_correction_bias, *args)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    sigmoid = router.config.scoring_func == "sigmoid"  # softmax's sum runs in another order than torch's
    if sigmoid and (not router.config.norm_topk_prob or router.top_k == 1):  # same sigmoid, same gather: exact
        assert torch.equal(weights, want_weights), (weights - want_weights).abs().max()
    assert torch.equal(counts, torch.bincount(want_indices.flatten(), minlength=router.num_experts))
    assert not moe_routing._semaphores(x.device).any()  # every counter back to zero


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_indices_op_matches_the_torch_choice_at_training_sizes_on_gpu(name):
    """`route_indices` (the kernel routing given logits, no counts) at a training step's 16k tokens: the experts
    torch's routing chooses from the same logits, in the same order."""
    gpu_ready()
    router, x = router_and_tokens(name, 16384, "cuda", torch.bfloat16, seed=5, hidden=2048)
    args = moe_routing.routing_args(router.config)
    with torch.no_grad():
        logits = F.linear(x.float(), router.weight.float())
        got = moe_routing.route_indices(logits, router.e_score_correction_bias, *args)
        want = moe_routing.choose_experts(moe_routing.score(logits, args), router.e_score_correction_bias, args)
    assert torch.equal(got, want)
    assert moe_routing.routes_indices(router, logits)


@pytest.mark.gpu
def test_kernel_breaks_exact_ties_towards_the_lower_index_on_gpu():
    gpu_ready()
    router, x = router_and_tokens("v3", 3, "cuda")
    args = moe_routing.routing_args(router.config)
    with torch.no_grad():
        router.weight.zero_()  # every score 0.5: every group and expert tied
        router.e_score_correction_bias.zero_()
        indices, weights, counts, _ = moe_routing.launch(x, router.weight, router.e_score_correction_bias, *args)
    assert indices.tolist() == [[0, 1, 2, 3, 4, 5]] * 3
    torch.testing.assert_close(weights, torch.full_like(weights, 2.5 / 6))
    assert counts.tolist() == [3] * 6 + [0] * 58


@pytest.mark.gpu
def test_kernel_in_a_cuda_graph_and_compiled_on_gpu():
    """Captured in a CUDA graph and replayed (the counters reset themselves), and inside a compiled function with
    CUDA graphs, the op gives the eager kernel's routing."""
    gpu_ready()
    router, x = router_and_tokens("v3", 4, "cuda", torch.bfloat16, hidden=2048)
    args = (router.weight, router.e_score_correction_bias, *moe_routing.routing_args(router.config))
    with torch.no_grad():
        eager = moe_routing.route_tokens(x, *args)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = moe_routing.route_tokens(static_x, *args)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert_same_routing(captured, eager)
        other = torch.randn_like(x)
        static_x.copy_(other)
        graph.replay()
        assert_same_routing(captured, moe_routing.route_tokens(other, *args))
        compiled = torch.compile(lambda x: moe_routing.route_tokens(x, *args), mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            again = [t.clone() for t in compiled(x)]
    assert_same_routing(again, eager)


@pytest.mark.gpu
def test_model_decode_with_the_kernel_on_gpu(monkeypatch):
    """A tiny model's greedy decode takes the kernel for its routers and gives the torch router's tokens."""
    gpu_ready()
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, num_hidden_layers=3)
    model = DeepSeekForCausalLM(config).cuda().eval()
    ids = torch.randint(3, config.vocab_size, (2, 12), device="cuda")
    calls = []
    original = moe_routing.route_tokens
    monkeypatch.setattr(moe_routing, "route_tokens", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    with_kernel = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert 24 in calls  # the prefill's 2 x 12 tokens (eager); the compiled decode steps' 2 tokens take it too
    monkeypatch.setattr(moe_routing, "ENABLED", False)
    without = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(with_kernel, without)


@pytest.mark.gpu
def test_kernel_first_called_inside_cuda_graph_trees_on_gpu(monkeypatch):
    """The op's first call on a device inside Inductor's CUDA-graph trees (their warm-up routes the thread's
    allocations to the graph pool) keeps no pool tensor alive: generate()'s device loop over a prefill too long for
    the kernel (so the compiled step's warm-up makes the counters) runs, with the torch router's tokens. Before, it
    failed with "tensor(s) in the cudagraph pool not tracked as outputs" and fell back to transformers' loop."""
    gpu_ready()
    monkeypatch.setattr(kernel_counters, "_BUFFERS", {})
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, num_hidden_layers=3)
    model = DeepSeekForCausalLM(config).cuda().eval()
    ids = torch.randint(3, config.vocab_size, (2, moe_routing.MAX_TOKENS), device="cuda")  # prefill: torch router
    with_kernel = model.generate(ids, max_new_tokens=12, do_sample=False, fast_loop=True)
    assert kernel_counters._BUFFERS and not any(t.any() for t in kernel_counters._BUFFERS.values())
    monkeypatch.setattr(moe_routing, "ENABLED", False)
    model.__dict__.pop("_fast_decode_step", None)
    without = model.generate(ids, max_new_tokens=12, do_sample=False, fast_loop=True)
    assert torch.equal(with_kernel, without)


def graph_us(fn) -> float:
    return graph_time_us(fn, calls=50, replays=20)


@pytest.mark.gpu
def test_kernel_time_on_gpu(monkeypatch):
    """The profiled model's router (64 experts, d = 2048, fp32 router weight): the compiled torch router against the
    kernel inside CUDA graphs, and at batch 1 other kernel configs (BLOCK_T, BLOCK_E, BLOCK_D, warps); `-s` prints
    the times."""
    gpu_ready()
    router, _ = router_and_tokens("v3", 1, "cuda", hidden=2048)
    args = (router.weight, router.e_score_correction_bias, *moe_routing.routing_args(router.config))
    lines = []
    with torch.no_grad():
        for tokens in (1, 4, 32, 256):
            x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
            monkeypatch.setattr(moe_routing, "ENABLED", False)
            torch_router = torch.compile(lambda x: router(x, 1))
            torch_us = graph_us(lambda x=x, f=torch_router: f(x))
            monkeypatch.setattr(moe_routing, "ENABLED", True)
            kernel_us = graph_us(lambda x=x: moe_routing.route_tokens(x, *args))
            lines.append(f"{tokens} tokens: torch router (Inductor) {torch_us:.1f} us, kernel {kernel_us:.1f} us")
            if tokens == 1:
                assert kernel_us < torch_us
                for config in ((1, 1, 2048, 1), (1, 2, 1024, 1), (1, 1, 1024, 1), (1, 1, 2048, 2), (1, 4, 2048, 4)):
                    us = graph_us(lambda x=x, c=config: moe_routing.launch(x, *args, config=c))
                    lines.append(f"  config {config}: {us:.1f} us")
            if tokens == 32:
                us = graph_us(lambda x=x: moe_routing.launch(x, *args, fuse=True))
                lines.append(f"  fused logits: {us:.1f} us")
    print("\n".join(lines))
