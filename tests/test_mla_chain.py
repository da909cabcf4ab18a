"""A batch-1 decode step's MLA input chain in one launch (`kernels/mla_chain.py`, HF_DEEPSEEK_MLA_CHAIN=1): on the CPU
the op's torch path against the three ops it joins, a model's decode through it against the default path, eager and
compiled; on a GPU the persistent kernel (grid barriers between its phases) against its phases launched apart, bit
for bit, repeated and replayed in a CUDA graph, and a model's greedy tokens. Triton's interpreter runs the phases:
`benchmarks/triton_interpreter_check.py` (section `mla_chain`)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_mla_front import V3_LATENT, relative_error

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import mla_chain, mla_decode_triton, mla_front, moe_gemv
from hf_deepseek.modeling.decode_linear import use_decode_linears
from hf_deepseek.modeling.latent_cache import LatentStaticCache


def chain_inputs(dim, rank_q, heads, nope, rank, rope, dtype=torch.float32, device="cpu"):
    """x, W_qa, W_kva, the q_a norm's weight, W_qb, cos, sin, the kv norm's weight and a W_UK that is a view of a
    kv_b-like weight, as the attention passes them."""
    angles = torch.rand(1, rope // 2) * 6
    tensors = (
        torch.randn(1, dim), torch.randn(rank_q, dim) * dim**-0.5, torch.randn(rank + rope, dim) * dim**-0.5,
        1 + torch.randn(rank_q) / 4, torch.randn(heads * (nope + rope), rank_q) * rank_q**-0.5, angles.cos(),
        angles.sin(), 1 + torch.randn(rank) / 4, (torch.randn(heads, nope + 48, rank) * nope**-0.5)[:, :nope],
    )  # fmt: skip
    return [t.to(device=device, dtype=dtype) for t in tensors]


def call(op, inputs, storage, length, interleaved=True, **kwargs):
    x, w_qa, w_kva, g_q, w_qb, cos, sin, g_kv, w_uk = inputs
    return op(x, w_qa, w_kva, g_q, 1e-6, w_qb, cos, sin, g_kv, 1e-6, w_uk, storage, length, interleaved, **kwargs)


@pytest.mark.parametrize("interleaved", [True, False])
def test_op_torch_path_is_the_three_ops(interleaved):
    """The joined query, the cache entry and the length as q_a / kv_a, the normed q_b and the front give them, each
    computed by hand here (bf16: every rounding where the ops make it)."""
    torch.manual_seed(0)
    inputs = chain_inputs(64, 48, 4, 16, 32, 16, torch.bfloat16)
    x, w_qa, w_kva, g_q, w_qb, cos, sin, g_kv, w_uk = inputs
    storages = [torch.zeros(1, 10, 48, dtype=torch.bfloat16) for _ in range(2)]
    lengths = [torch.tensor(3), torch.tensor(3)]
    query, new_lengths = call(mla_chain.mla_decode_chain, inputs, storages[0], lengths[0], interleaved)
    q_a, kv_a = F.linear(x, w_qa), F.linear(x, w_kva)
    q = F.linear(moe_gemv.rms_norm(q_a, g_q, 1e-6), w_qb).view(1, 4, 32)
    want = mla_front.reference(q, kv_a, cos, sin, g_kv, 1e-6, w_uk, storages[1], lengths[1], interleaved)
    assert torch.equal(query, want[0]) and torch.equal(new_lengths, want[1]) and new_lengths.tolist() == [4]
    assert torch.equal(storages[0], storages[1]) and storages[0][:, 3].any() and int(lengths[0]) == 4
    with pytest.raises(ValueError, match="mla_decode_chain takes one row with its cos and sin, got 2 and 1"):
        call(mla_chain.mla_decode_chain, [torch.cat([x, x])] + inputs[1:], storages[0], lengths[0])


def chain_on_the_cpu(monkeypatch):
    """The GPU path's choices on the CPU: the dense layers' decode row, the Triton attention op and the chain
    declared usable (their ops run their torch paths); returns the list each chain op call appends to."""
    monkeypatch.setattr(moe_gemv, "usable_linear", lambda rows, w: rows.shape[0] == 1 and not torch.is_grad_enabled())
    monkeypatch.setattr(mla_decode_triton, "usable", lambda *args: True)
    monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", "triton")
    calls, reference = [], mla_chain.reference
    monkeypatch.setattr(mla_chain, "reference", lambda *args: calls.append(1) or reference(*args))
    return calls


def decode(model, config, ids, steps, step=None) -> tuple[torch.Tensor, list[int]]:
    """The steps' logits after a prefill of ids (one row), and the layers' cache lengths afterwards."""
    cache = LatentStaticCache(config, max_cache_len=40)
    cache.unpadded = True
    step = step or model.__call__
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        position = torch.arange(ids.shape[1], ids.shape[1] + steps.shape[1])[None]
        logits = [step(input_ids=steps[:, i : i + 1], position_ids=position[:, i : i + 1], cache=cache,
                       use_cache=True).logits for i in range(steps.shape[1])]  # fmt: skip
    return torch.cat(logits, dim=1), [
        int(layer.cumulative_length) for layer in cache.layers[: config.num_hidden_layers]
    ]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_decode_through_the_chain_equals_the_default_path(monkeypatch, compiled):
    """One row's decode steps with the chain standing in for q_a / kv_a, q_b and the front of every layer give the
    default path's logits and cache lengths; compiled, one graph without a break."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    calls = chain_on_the_cpu(monkeypatch)
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    use_decode_linears(model)
    ids, steps = torch.randint(3, config.vocab_size, (1, 30)), torch.randint(3, config.vocab_size, (1, 3))
    default = decode(model, config, ids, steps)
    assert not calls
    monkeypatch.setattr(mla_chain, "ENABLED", True)  # as HF_DEEPSEEK_MLA_CHAIN=1: the layer's input norm apart
    monkeypatch.setattr(mla_chain, "usable", lambda x, *args: x.shape[0] == 1)
    torch.compiler.reset()
    counters.clear()
    step = model.get_compiled_call(CompileConfig(backend="eager", mode=None)) if compiled else None
    with torch._dynamo.config.patch(error_on_recompile=True, recompile_limit=1):
        chained = decode(model, config, ids, steps, step)
    torch.compiler.reset()
    model.__dict__.pop("_compiled_call", None)
    assert calls and (compiled or len(calls) == 3 * config.num_hidden_layers)
    if compiled:
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert chained[1] == default[1] == [33] * config.num_hidden_layers
    torch.testing.assert_close(chained[0], default[0], rtol=1e-5, atol=1e-5)


# on a GPU: the persistent kernel


@pytest.fixture
def triton_cuda():
    if not (torch.cuda.is_available() and moe_gemv.triton_available()):
        pytest.skip("needs CUDA and Triton")


BENCH_SHAPES = (2048, 1536, 16, 128, 512, 64)  # d, q rank, heads, nope, r, rope: the bench's attention


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
def test_kernel_is_its_phases_launched_apart(triton_cuda, interleaved):
    """bf16 at the bench's shapes, five steps in a row (the barrier's counters reused): the persistent launch gives
    the phased launches' query, entries and lengths bit for bit, within bf16 rounding of the torch path."""
    from hf_deepseek.kernels._mla_chain_triton import launch

    torch.manual_seed(1)
    inputs = chain_inputs(*BENCH_SHAPES, torch.bfloat16, "cuda")
    storages = [torch.zeros(1, 64, 576, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    lengths = [torch.tensor(9, device="cuda") for _ in range(3)]
    for _ in range(5):
        got = call(launch, inputs, storages[0], lengths[0], interleaved)
        phased = call(launch, inputs, storages[1], lengths[1], interleaved, phased=True)
        want = call(mla_chain.reference, inputs, storages[2], lengths[2], interleaved)
        assert torch.equal(got[0], phased[0]) and torch.equal(got[1], phased[1])
        assert relative_error(got[0], want[0]) < 2e-3
    assert torch.equal(storages[0], storages[1]) and int(lengths[0]) == int(lengths[1]) == 14
    assert relative_error(storages[0][:, 9:14], storages[2][:, 9:14]) < 2e-3


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph(triton_cuda):
    """Captured once, each replay writes the next position and counts it, as the eager launches do."""
    from hf_deepseek.kernels._mla_chain_triton import launch

    torch.manual_seed(2)
    inputs = chain_inputs(*BENCH_SHAPES, torch.bfloat16, "cuda")
    storages = [torch.zeros(1, 16, 576, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    lengths = [torch.tensor(0, device="cuda") for _ in range(2)]
    call(launch, inputs, storages[0], lengths[0])  # compiles the kernel outside the capture
    lengths[0].zero_()
    storages[0].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(launch, inputs, storages[0], lengths[0])
    for _ in range(3):
        graph.replay()
        call(launch, inputs, storages[1], lengths[1])
    torch.cuda.synchronize()
    assert int(lengths[0]) == int(lengths[1]) == 3  # capturing runs nothing
    assert torch.equal(storages[0], storages[1]) and storages[0][:, :3].any(-1).all()


@pytest.mark.gpu
def test_model_greedy_tokens_through_the_chain_on_gpu(triton_cuda, monkeypatch):
    """A bf16 model's greedy decode (generate(), compiled, batch 1) with the chain gives the default path's tokens."""
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, config.vocab_size, (1, 20), device="cuda")
    tokens, calls, original = {}, [], mla_chain.mla_decode_chain
    monkeypatch.setattr(mla_chain, "mla_decode_chain", lambda *a: calls.append(mla_chain.ENABLED) or original(*a))
    for chained in (False, True):
        monkeypatch.setattr(mla_chain, "ENABLED", chained)
        for compiled in ("_compiled_call", "_fast_decode_step", "_fast_decode_buffers"):  # generate() compiles anew
            model.__dict__.pop(compiled, None)
        torch.compiler.reset()
        tokens[chained] = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert calls and all(calls)  # traced with the chain on only
    assert torch.equal(tokens[True], tokens[False])
