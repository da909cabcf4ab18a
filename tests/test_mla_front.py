"""A decode step's MLA front in one launch (`kernels/mla_front.py`): on the CPU the op's torch path against float64, a
model's decode through it (HF_DEEPSEEK_MLA_FRONT, on by default) against the default path, eager and compiled; on a GPU
the kernel against the torch path, eager and replayed in a CUDA graph."""

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import mla_decode_triton, mla_front
from hf_deepseek.modeling.attention import apply_rope
from hf_deepseek.modeling.latent_cache import LatentStaticCache

V3_LATENT = dict(hidden_size=256, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                 v_head_dim=64, q_lora_rank=128, initializer_range=0.05)  # fmt: skip


def front_inputs(rows, heads, nope, rank, rope, dtype=torch.float32, device="cpu"):
    """q, a kv_a that is a slice of a wider output, cos, sin, the norm's weight and a W_UK that is a view of a kv_b-like
    weight, as the attention passes them."""
    q = torch.randn(rows, heads, nope + rope)
    kv_a = torch.randn(rows, 7 + rank + rope)[:, 7:]
    angles = torch.rand(rows, rope // 2) * 6
    norm_weight = 1 + torch.randn(rank) / 4
    w_uk = (torch.randn(heads, nope + 48, rank) * nope**-0.5)[:, :nope]
    return [t.to(device=device, dtype=dtype) for t in (q, kv_a, angles.cos(), angles.sin(), norm_weight, w_uk)]


def float64_front(q, kv_a, cos, sin, norm_weight, eps, w_uk, interleaved):
    nope, rank = w_uk.shape[1], w_uk.shape[2]
    q, kv_a, cos, sin = q.double(), kv_a.double(), cos.double(), sin.double()
    q_latent = torch.einsum("bhk,hkr->bhr", q[..., :nope], w_uk.double())
    q_rope = apply_rope(q[:, :, None, nope:], cos[:, None], sin[:, None], interleaved)[:, :, 0]
    latent = kv_a[:, :rank]
    normed = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    k_rope = apply_rope(kv_a[:, None, None, rank:], cos[:, None], sin[:, None], interleaved)[:, 0, 0]
    return torch.cat([q_latent, q_rope], -1), torch.cat([normed, k_rope], -1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rows,heads,nope,rank,rope", [(1, 16, 128, 512, 64), (3, 4, 64, 40, 16)])
def test_op_torch_path_matches_float64(rows, heads, nope, rank, rope, interleaved):
    """The joined query, the entry written at the length (nothing else written) and the length counted."""
    torch.manual_seed(rows + rank)
    q, kv_a, cos, sin, norm_weight, w_uk = front_inputs(rows, heads, nope, rank, rope)
    storage, length = torch.zeros(rows, 12, rank + rope), torch.tensor(5)
    args = (q, kv_a, cos, sin, norm_weight, 1e-6, w_uk, storage, length, interleaved)
    query, lengths = mla_front.mla_decode_front(*args)
    want_query, want_entry = float64_front(q, kv_a, cos, sin, norm_weight, 1e-6, w_uk, interleaved)
    assert query.shape == (rows, heads, rank + rope) and query.dtype == q.dtype
    assert relative_error(query, want_query) < 1e-6
    assert relative_error(storage[:, 5], want_entry) < 1e-6
    assert not storage[:, :5].any() and not storage[:, 6:].any()
    assert int(length) == 6 and lengths.dtype == torch.int32 and lengths.tolist() == [6] * rows
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mla_front.mla_decode_front(
            *(mode.from_tensor(t) for t in (q, kv_a, cos, sin, norm_weight)), 1e-6, mode.from_tensor(w_uk),
            mode.from_tensor(storage), mode.from_tensor(length), interleaved,
        )  # fmt: skip
    assert fake[0].shape == query.shape and fake[1].shape == lengths.shape and fake[1].dtype == torch.int32


def decode_logits(model, config, ids, steps) -> tuple[torch.Tensor, torch.Tensor]:
    """Three decode steps' logits after a prefill, and the first layer's cache afterwards."""
    cache = LatentStaticCache(config, max_cache_len=40)
    cache.unpadded = True
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        logits = torch.cat([model(steps[:, i : i + 1], cache=cache).logits for i in range(3)], dim=1)
    assert all(int(layer.cumulative_length) == ids.shape[1] + 3 for layer in cache.layers[: config.num_hidden_layers])
    return logits, cache.layers[0].buffer().clone()


def torch_flash_attention(query, storage, length, scale, schedule=None):
    """FlashMLA's place on the CPU: the Triton op's torch path over the same storage."""
    lengths = length.to(torch.int32).expand(storage.shape[0])
    return mla_decode_triton.reference(query.squeeze(2), storage, lengths, scale, 512).unsqueeze(2)


@pytest.mark.parametrize(
    "attention,overrides",
    [
        ("triton", {}),
        ("triton-fused", {}),
        ("flash", {}),
        ("triton", {"rope_interleave": False, "q_lora_rank": None, "num_nextn_predict_layers": 1}),
    ],
    ids=["triton", "triton-fused", "flash", "triton-halves-q-proj-mtp"],
)
def test_model_decode_through_the_front_equals_the_default_path(monkeypatch, attention, overrides):
    """HF_DEEPSEEK_MLA_FRONT's path (the op's torch path on the CPU) before the Triton attention op, its fused form, or
    FlashMLA (its place taken by torch attention here) gives the default path's logits and cache; also with RoPE on
    halves, no query compression and an MTP layer."""
    from hf_deepseek.kernels import flash_mla_decode
    from hf_deepseek.modeling import mla_decode

    monkeypatch.setattr(mla_decode_triton, "usable", lambda *args: True)
    monkeypatch.setattr(flash_mla_decode, "usable", lambda *args: True)
    monkeypatch.setattr(mla_decode, "flash_latent_attention", torch_flash_attention)
    monkeypatch.setattr(mla_decode, "flash_mla_schedule", lambda *args: None)
    monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", attention.removesuffix("-fused"))
    monkeypatch.setattr(mla_decode_triton, "FUSED", attention == "triton-fused")
    calls, reference = [], mla_front.reference
    monkeypatch.setattr(mla_front, "reference", lambda *args: calls.append(1) or reference(*args))
    torch.manual_seed(0)
    config = tiny_config(**(V3_LATENT | overrides))
    model = DeepSeekForCausalLM(config).eval()
    ids, steps = torch.randint(3, config.vocab_size, (2, 30)), torch.randint(3, config.vocab_size, (2, 3))
    default = decode_logits(model, config, ids, steps)
    assert not calls
    monkeypatch.setattr(mla_front, "usable", lambda *args: True)
    front = decode_logits(model, config, ids, steps)
    assert len(calls) == 3 * config.num_hidden_layers
    torch.testing.assert_close(front[0], default[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(front[1], default[1], rtol=1e-5, atol=1e-6)


def test_compiled_decode_through_the_front_is_one_graph(monkeypatch):
    """The compiled decode step (as generate() and the bench compile it) through the front and the Triton attention
    op: one graph for every step, no graph break, the eager path's logits and cache lengths, and no two graph inputs
    over the same memory (which would cost the step Inductor's CUDA graphs)."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    monkeypatch.setattr(mla_decode_triton, "usable", lambda *args: True)
    monkeypatch.setattr(mla_front, "usable", lambda *args: True)
    monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", "triton")
    calls, reference = [], mla_front.reference
    monkeypatch.setattr(mla_front, "reference", lambda *args: calls.append(1) or reference(*args))
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    ids, steps = torch.randint(3, config.vocab_size, (2, 30)), torch.randint(3, config.vocab_size, (2, 4))
    shared_storage = []

    def backend(gm, example_inputs):  # records Dynamo's graph inputs, then runs the graph eagerly
        pointers = [t.untyped_storage().data_ptr() for t in example_inputs if isinstance(t, torch.Tensor)]
        shared_storage.append(len(pointers) - len(set(pointers)))
        return gm.forward

    logits, lengths = {}, {}
    torch.compiler.reset()
    counters.clear()
    for compiled in (False, True):
        cache = LatentStaticCache(config, max_cache_len=40)
        cache.unpadded = True
        step = model.get_compiled_call(CompileConfig(backend=backend, mode=None)) if compiled else model.__call__
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True, recompile_limit=1):
            model(ids, cache=cache, use_cache=True)
            position = torch.arange(30, 34)[None].expand(2, -1)
            outputs = [step(input_ids=steps[:, i : i + 1], position_ids=position[:, i : i + 1], cache=cache,
                            use_cache=True).logits for i in range(4)]  # fmt: skip
        logits[compiled] = torch.cat(outputs, dim=1)
        lengths[compiled] = [int(layer.cumulative_length) for layer in cache.layers[: config.num_hidden_layers]]
    torch.compiler.reset()
    model.__dict__.pop("_compiled_call", None)
    assert calls, "the op was not called"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert shared_storage == [0]
    assert lengths[True] == lengths[False] == [34] * config.num_hidden_layers
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-5)


def test_inductor_compiles_the_front_in_place():
    """Inductor on the CPU: the op writes the cache storage and length passed in (no copy of them is written
    instead), and a second call writes the next position."""
    torch.manual_seed(1)
    q, kv_a, cos, sin, norm_weight, w_uk = front_inputs(2, 4, 64, 40, 16)
    storage, length = torch.zeros(2, 12, 56), torch.tensor(3)

    def step(q, kv_a, storage, length):
        return mla_front.mla_decode_front(q, kv_a, cos, sin, norm_weight, 1e-6, w_uk, storage, length, True)[0] * 2

    compiled = torch.compile(step, fullgraph=True)
    first = compiled(q, kv_a, storage, length)
    second = compiled(q, kv_a, storage, length)
    torch.testing.assert_close(first, second)
    assert int(length) == 5
    assert storage[:, 3].any() and torch.equal(storage[:, 3], storage[:, 4])
    assert not storage[:, :3].any() and not storage[:, 5:].any()


@pytest.fixture
def triton_cuda():
    from hf_deepseek.kernels.moe_gemv import triton_available

    if not (torch.cuda.is_available() and triton_available()):
        pytest.skip("needs CUDA and Triton")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, 20])
@pytest.mark.parametrize("interleaved", [True, False])
def test_kernel_matches_the_torch_path(triton_cuda, rows, interleaved):
    """bf16 at the bench's attention shapes (16 heads, nope 128, r 512, rope 64): the joined query and the entry
    within one bf16 rounding of the torch path, nothing else written, the length counted."""
    from hf_deepseek.kernels._mla_front_triton import launch

    torch.manual_seed(rows)
    inputs = front_inputs(rows, 16, 128, 512, 64, torch.bfloat16, "cuda")
    storages = [torch.zeros(rows, 64, 576, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    lengths = [torch.tensor(9, device="cuda") for _ in range(2)]
    got, got_lengths = launch(*inputs[:5], 1e-6, inputs[5], storages[0], lengths[0], interleaved)
    want, want_lengths = mla_front.reference(*inputs[:5], 1e-6, inputs[5], storages[1], lengths[1], interleaved)
    assert torch.equal(got_lengths, want_lengths) and got_lengths.tolist() == [10] * rows
    assert relative_error(got, want) < 2e-3
    assert relative_error(storages[0][:, 9], storages[1][:, 9]) < 2e-3
    assert not storages[0][:, :9].any() and not storages[0][:, 10:].any()
    assert int(lengths[0]) == 10


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph(triton_cuda):
    """Captured once, each replay writes the next position and counts it."""
    from hf_deepseek.kernels._mla_front_triton import launch

    torch.manual_seed(0)
    inputs = front_inputs(2, 16, 128, 512, 64, torch.bfloat16, "cuda")
    storage, length = torch.zeros(2, 16, 576, dtype=torch.bfloat16, device="cuda"), torch.tensor(0, device="cuda")
    launch(*inputs[:5], 1e-6, inputs[5], storage, length, True)  # compiles the kernel outside the capture
    length.zero_()
    storage.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(*inputs[:5], 1e-6, inputs[5], storage, length, True)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert int(length) == 3  # capturing runs nothing
    assert storage[:, :3].any(-1).all() and not storage[:, 3:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["attention-apart", "fused-attention"])
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_model_decode_on_the_gpu_through_the_front(triton_cuda, monkeypatch, batch, fused):
    """A bf16 model's decode steps on CUDA with the front's kernel and the Triton attention (its epilogue apart or
    fused) give the path's logits and cache without the front (within bf16 rounding), row by row. Every token takes
    both experts: a near-tied routing choice flipped by one rounding would move a row's logits far more than the
    kernel's rounding does (3.9% at batch 4 with top-2 of 8 experts, 2026-12-06)."""
    monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", "triton")
    monkeypatch.setattr(mla_decode_triton, "FUSED", fused)
    monkeypatch.setattr(mla_front, "MAX_ROWS", batch)
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT, n_routed_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1)
    model = DeepSeekForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, config.vocab_size, (batch, 30), device="cuda")
    steps = torch.randint(3, config.vocab_size, (batch, 3), device="cuda")
    logits = {}
    for front in (False, True):
        monkeypatch.setattr(mla_front, "ENABLED", front)
        logits[front] = decode_logits(model, config, ids, steps)
    rows = [relative_error(logits[True][0][b].float(), logits[False][0][b].float()) for b in range(batch)]
    cache = relative_error(logits[True][1].float(), logits[False][1].float())  # the first layer's
    assert max(rows) < 2e-2 and cache < 1e-2, (rows, cache)
