"""The expert-grouped decode kernels (`kernels/moe_grouped_gemv.py`): the pairs' sort and offsets, the ops' torch
computation against a float64 per-expert reference on the CPU (bf16 and FP8 weights, experts with no pairs and with
many), the dispatch of bf16 and FP8 experts, the model's decode path through the op; on a GPU the Triton kernels
against float64 at the bench's expert shapes, and their replay in a CUDA graph."""

import pytest
import torch
from conftest import tiny_config
from test_moe_gemv import experts_and_routing, fp8_args, fp8_experts_and_routing, per_expert_float64

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import moe_gemv, moe_gemv_config, moe_grouped_gemv
from hf_deepseek.kernels.moe_routing import sort_pairs
from hf_deepseek.modeling.moe import RoutedExperts


def skewed_indices(tokens: int, top_k: int, num_experts: int, device="cpu") -> torch.Tensor:
    """Every token chooses expert 1 (more pairs than a BLOCK_T chunk once tokens > 16) and top_k - 1 others of the
    lower half of the experts, so the upper half get no pairs; the choices in a random order."""
    half = num_experts // 2
    rows = [torch.cat([torch.tensor([1]), torch.tensor([0, *range(2, half)])[torch.randperm(half - 1)[: top_k - 1]]])
            for _ in range(tokens)]  # fmt: skip
    return torch.stack([row[torch.randperm(top_k)] for row in rows]).to(device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def dense_experts_of(fp8, device="cpu") -> RoutedExperts:
    """A RoutedExperts holding FP8 experts' dequantised (float32) weights."""
    gate_up, down = fp8.dequantized_weights()
    experts, hidden, inter = down.shape
    dense = RoutedExperts(tiny_config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts))
    dense.gate_up_proj.data, dense.down_proj.data = gate_up, down
    return dense.to(device)


@pytest.mark.parametrize("tokens", [1, 6, 33, 64])
def test_sort_pairs_groups_each_experts_pairs_in_token_order(tokens):
    indices = skewed_indices(tokens, 6, 16)
    order, offsets = sort_pairs(indices, 16)
    flat = indices.flatten()
    assert offsets.dtype == torch.int32 and offsets.shape == (17,) and offsets[0] == 0 and offsets[-1] == flat.numel()
    assert torch.equal(order.sort().values, torch.arange(flat.numel()))  # a permutation of the pairs
    for e in range(16):
        segment = order[offsets[e] : offsets[e + 1]]
        assert torch.equal(segment, (flat == e).nonzero().flatten())  # e's pairs, by token
    if tokens > 1:
        assert offsets[2] - offsets[1] == tokens and torch.equal(offsets[8:], offsets[8].repeat(9))  # 8-15: none


@pytest.mark.parametrize("tokens", [6, 33, 64])
def test_the_kernels_bookkeeping_computes_the_chosen_experts(tokens):
    """The kernels' walk in float64: per expert its rows act[offsets[e]:offsets[e+1]] of the sorted pairs (token
    order[r] // k), then the down projection written to pair order[r], summed over each token's k: the per-pair
    float64 reference."""
    experts, x, _, weights = experts_and_routing("cpu", torch.float32, tokens=tokens)
    indices = skewed_indices(tokens, 6, 16)
    order, offsets = sort_pairs(indices, 16)
    inter = experts.down_proj.shape[2]
    act = torch.empty(order.numel(), inter, dtype=torch.float64)
    out = torch.empty(order.numel(), x.shape[1], dtype=torch.float64)
    for e in range(16):
        rows = slice(offsets[e], offsets[e + 1])
        gate, up = (x[order[rows] // 6].double() @ experts.gate_up_proj[e].double().T).chunk(2, dim=1)
        act[rows] = torch.nn.functional.silu(gate) * up
        out[order[rows]] = act[rows] @ experts.down_proj[e].double().T * weights.flatten()[order[rows], None].double()
    want = per_expert_float64(experts, x, indices, weights)
    torch.testing.assert_close(out.view(tokens, 6, -1).sum(dim=1), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [6, 33, 64])
def test_op_computes_the_chosen_experts_on_the_cpu(tokens, dtype):
    experts, x, _, weights = experts_and_routing("cpu", dtype, tokens=tokens)
    indices = skewed_indices(tokens, 6, 16)
    with torch.no_grad():
        out = moe_grouped_gemv.routed_experts_grouped_gemv(x, indices, weights, experts.gate_up_proj,
                                                           experts.down_proj)  # fmt: skip
    want = per_expert_float64(experts, x, indices, weights)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert not moe_grouped_gemv.usable(experts, x, tokens * 6)  # CUDA only, and bf16 experts only when asked


@pytest.mark.parametrize("inter", [160, 256])  # partial scale blocks, and whole ones
@pytest.mark.parametrize("tokens", [6, 33, 64])
def test_fp8_op_computes_the_chosen_experts_from_the_dequantised_weights(tokens, inter):
    fp8, x, _, weights = fp8_experts_and_routing("cpu", torch.float32, inter, tokens=tokens)
    indices = skewed_indices(tokens, 6, 16)
    with torch.no_grad():
        out = moe_grouped_gemv.routed_experts_grouped_gemv_fp8(x, indices, weights, *fp8_args(fp8))
        bf16 = moe_grouped_gemv.routed_experts_grouped_gemv_fp8(x.bfloat16(), indices, weights, *fp8_args(fp8))
    want = per_expert_float64(dense_experts_of(fp8), x, indices, weights)
    assert relative_error(out, want) < 1e-6
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16, want) < 1e-2
    assert not moe_grouped_gemv.usable_fp8(fp8, x, indices.numel())  # CUDA only


def test_ops_trace_as_one_node_with_their_fake_kernels():
    """Under torch.compile (fullgraph) each op is one node traced through its fake kernel: x's shape and dtype."""
    fp8, x, _, weights = fp8_experts_and_routing("cpu", torch.float32, 256, tokens=33)
    indices = skewed_indices(33, 6, 16)
    dense = dense_experts_of(fp8)
    ops = ((moe_grouped_gemv.routed_experts_grouped_gemv_fp8, fp8_args(fp8)),
           (moe_grouped_gemv.routed_experts_grouped_gemv, (dense.gate_up_proj, dense.down_proj)))  # fmt: skip
    with torch.no_grad():
        for op, args in ops:
            compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
            assert torch.equal(compiled(x, indices, weights, *args), op(x, indices, weights, *args))


def test_the_grouped_ops_take_over_where_the_matrix_vector_kernels_stop(monkeypatch):
    """Beyond MAX_PAIRS, up to MAX_GROUPED_PAIRS, on the matrix-vector kernels' other conditions; bf16 experts unless
    HF_DEEPSEEK_MOE_GROUPED_GEMV=0 (GROUPED_GEMV)."""
    monkeypatch.setattr(moe_gemv, "usable_fp8", lambda experts, x, pairs: pairs <= moe_gemv.MAX_PAIRS)
    monkeypatch.setattr(moe_gemv, "usable", lambda experts, x, pairs: pairs <= moe_gemv.MAX_PAIRS)
    limits = (moe_gemv.MAX_PAIRS, moe_gemv.MAX_PAIRS + 1, 192, moe_grouped_gemv.MAX_GROUPED_PAIRS,
              moe_grouped_gemv.MAX_GROUPED_PAIRS + 1)  # fmt: skip
    assert [moe_grouped_gemv.usable_fp8(None, None, p) for p in limits] == [False, True, True, True, False]
    monkeypatch.setattr(moe_grouped_gemv, "GROUPED_GEMV", False)
    assert not any(moe_grouped_gemv.usable(None, None, p) for p in limits)
    monkeypatch.setattr(moe_grouped_gemv, "GROUPED_GEMV", True)
    assert [moe_grouped_gemv.usable(None, None, p) for p in limits] == [False, True, True, True, False]
    monkeypatch.setattr(moe_gemv, "usable_fp8", lambda experts, x, pairs: False)  # e.g. grad mode, or on the CPU
    assert not moe_grouped_gemv.usable_fp8(None, None, 192)


def test_fp8_experts_take_the_grouped_op_beyond_the_matrix_vector_kernels(monkeypatch):
    """FP8InferenceExperts.forward at 33 tokens x top-6 (198 pairs): the grouped op, which computes what the
    matrix-vector op does, instead of the FP8 GEMM path."""
    fp8, x, _, weights = fp8_experts_and_routing("cpu", torch.float32, 256, tokens=33)
    indices = skewed_indices(33, 6, 16)
    calls = []
    original = moe_grouped_gemv.routed_experts_grouped_gemv_fp8
    monkeypatch.setattr(moe_grouped_gemv, "usable_fp8", lambda experts, x, pairs: pairs > moe_gemv.MAX_PAIRS)
    counted = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
    monkeypatch.setattr(moe_grouped_gemv, "routed_experts_grouped_gemv_fp8", counted)
    with torch.no_grad():
        grouped = fp8(x, indices, weights)
        assert calls == [1]
        gemv = moe_gemv.routed_experts_gemv_fp8(x, indices, weights, *fp8_args(fp8))
        fp8.fp8_recipe = type(fp8.fp8_recipe)(weight_only_decode=False)
        gemm_path = fp8(x, indices, weights)
    assert calls == [1] and torch.equal(grouped, gemv)
    assert 1e-4 < relative_error(gemm_path, grouped) < 0.05  # the GEMM path quantises the activations per 1x128 tile


def test_model_decode_through_the_op_equals_the_default_path(monkeypatch):
    """Nine sequences at top-4: 36 pairs a decode step (beyond MAX_PAIRS), the bf16 switch on."""
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=4)
    model = DeepSeekForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (9, 12))
    default = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    calls, original = [], moe_grouped_gemv.routed_experts_grouped_gemv

    def switched_on(experts, x, pairs):
        return not torch.is_grad_enabled() and moe_gemv.MAX_PAIRS < pairs <= moe_grouped_gemv.MAX_GROUPED_PAIRS

    monkeypatch.setattr(moe_grouped_gemv, "usable", switched_on)
    monkeypatch.setattr(
        moe_grouped_gemv, "routed_experts_grouped_gemv", lambda *a, **k: calls.append(a[1].shape) or original(*a, **k)
    )
    through_op = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(through_op, default)
    assert (9, 4) in calls  # the decode steps' nine tokens went through the op


def test_grouped_config_parsing_and_checks():
    assert moe_gemv_config.grouped_config(None) == moe_gemv_config.GROUPED_CONFIG
    assert moe_gemv_config.grouped_config(None, fp8=True) == moe_gemv_config.GROUPED_FP8_CONFIG
    assert moe_gemv_config.grouped_config((4, 16, 256, 4)) == moe_gemv_config.GroupedConfig(4, 16, 256, 4, None)
    assert moe_gemv_config.parse_grouped_config("16, 64, 64, 8, 2") == moe_gemv_config.GroupedConfig(16, 64, 64, 8, 2)
    assert moe_gemv_config.parse_grouped_config("16,32,128,4,none").stages is None
    assert moe_gemv_config.parse_grouped_config(" ") is None
    for bad in ("16,32,128", "16,32,128,4,3,1", "12,32,128,4", "16,8,128,4", "16,32,128,4,0"):
        with pytest.raises(ValueError):
            moe_gemv_config.parse_grouped_config(bad)
    with pytest.raises(ValueError):  # an FP8 step's tile in one 128x128 block of scales
        moe_gemv_config.grouped_config((16, 32, 256, 4), fp8=True)
    env = {"HF_DEEPSEEK_MOE_GROUPED_GEMV_CONFIG": "8,16,64,4"}
    got = moe_gemv_config.config_from_env(env, names=tuple(env), parse=moe_gemv_config.parse_grouped_config)
    assert got == moe_gemv_config.GroupedConfig(8, 16, 64, 4, None)


# GPU: the Triton kernels at the bench's expert shapes (64 experts, hidden 2048, width 1408, top-6)

GROUPED_VARIANTS = [None, (16, 32, 128, 4, 3), (16, 64, 64, 8, 2), (32, 16, 128, 4, None), (4, 16, 128, 4, None)]


def bench_case(tokens: int, routing: str, fp8: bool):
    """(launcher arguments, float64 reference) at the bench's expert shapes; skips without Triton and CUDA (and
    FP8 conversions in Triton, for FP8)."""
    if not moe_gemv.triton_available() or (fp8 and not moe_gemv.fp8_kernels_available()):
        pytest.skip("needs Triton and a CUDA GPU (with FP8 for FP8 weights)")
    shape = dict(tokens=tokens, num_experts=64, hidden=2048)
    if fp8:
        experts, x, indices, weights = fp8_experts_and_routing("cuda", torch.bfloat16, 1408, **shape)
        dense = dense_experts_of(experts, "cuda")
        gate_up, gate_up_scale, down, down_scale = fp8_args(experts)
        args = (x, indices, weights, gate_up, down), dict(gate_up_scale=gate_up_scale, down_scale=down_scale)
    else:
        dense, x, indices, weights = experts_and_routing("cuda", torch.bfloat16, inter=1408, **shape)
        args = (x, indices, weights, dense.gate_up_proj, dense.down_proj), {}
    if routing == "skewed":  # expert 1 has a pair of every token (two chunks of 16 at 32 tokens), 32-63 none
        indices.copy_(skewed_indices(tokens, 6, 64, "cuda"))
    with torch.no_grad():
        want = per_expert_float64(dense, x, indices, weights)
    return args, want


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,top_k,experts", [(1, 1, 4), (6, 6, 16), (32, 6, 64), (170, 6, 256)])
def test_the_kernels_one_launch_sort_equals_torchs(tokens, top_k, experts):
    """The grouped kernels sort the pairs in one launch: the order and offsets of `sort_pairs` (torch's stable
    argsort), crowded experts and empty ones included."""
    if not moe_gemv.triton_available():
        pytest.skip("needs Triton and CUDA")
    from hf_deepseek.kernels import _moe_grouped_gemv_triton

    indices = skewed_indices(tokens, top_k, experts, "cuda") if top_k > 1 else torch.tensor([[2]], device="cuda")
    order, offsets = _moe_grouped_gemv_triton.sort_pairs(indices, experts)
    want_order, want_offsets = sort_pairs(indices, experts)
    assert torch.equal(order.long(), want_order) and torch.equal(offsets, want_offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("config", GROUPED_VARIANTS)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens,routing", [(32, "uniform"), (32, "skewed"), (5, "uniform")])
def test_triton_grouped_kernels_match_float64(tokens, routing, fp8, config):
    from hf_deepseek.kernels import _moe_grouped_gemv_triton

    (args, scales), want = bench_case(tokens, routing, fp8)
    with torch.no_grad():
        out = _moe_grouped_gemv_triton.launch(*args, config, **scales)
    assert out.dtype == torch.bfloat16 and out.shape == args[0].shape
    error = relative_error(out, want)
    assert error < 1e-2, error


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_grouped_kernels_replay_in_a_cuda_graph_with_new_routing(fp8):
    """Captured once (static grid and shapes, no host read), replayed after the routing and tokens change in place:
    the eager result of the new inputs."""
    from hf_deepseek.kernels import _moe_grouped_gemv_triton

    (args, scales), _ = bench_case(32, "uniform", fp8)
    x, indices, weights = args[:3]
    with torch.no_grad():
        _moe_grouped_gemv_triton.launch(*args, **scales)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = _moe_grouped_gemv_triton.launch(*args, **scales)
        x.copy_(torch.randn_like(x))
        indices.copy_(skewed_indices(32, 6, 64, "cuda"))
        weights.copy_(torch.rand_like(weights).softmax(dim=-1))
        graph.replay()
        eager = _moe_grouped_gemv_triton.launch(*args, **scales)
        if fp8:
            op = moe_grouped_gemv.routed_experts_grouped_gemv_fp8
            args = (*args[:3], args[3], scales["gate_up_scale"], args[4], scales["down_scale"])
        else:
            op = moe_grouped_gemv.routed_experts_grouped_gemv
        again = torch.compile(op, mode="reduce-overhead", fullgraph=True)(*args).clone()
    assert torch.equal(replayed, eager)
    torch.testing.assert_close(again, eager)


@pytest.mark.gpu
def test_fp8_experts_take_the_grouped_kernels_at_batch_32():
    if not moe_gemv.fp8_kernels_available():
        pytest.skip("needs Triton and a CUDA GPU with FP8")
    fp8, x, indices, weights = fp8_experts_and_routing("cuda", torch.bfloat16, 1408, tokens=32, num_experts=64,
                                                       hidden=2048)  # fmt: skip
    with torch.no_grad():
        assert moe_grouped_gemv.usable_fp8(fp8, x, 192) and not moe_gemv.usable_fp8(fp8, x, 192)
        out = fp8(x, indices, weights)
        want = per_expert_float64(dense_experts_of(fp8, "cuda"), x, indices, weights)
    assert not moe_grouped_gemv.usable_fp8(fp8, x, 192)  # grad mode on: training never takes it
    assert relative_error(out, want) < 1e-2
