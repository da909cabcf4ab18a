"""The Triton split-KV decode attention over the latent cache (`kernels/mla_decode_triton.py`): on the CPU its op's
torch path against float64 and a model's decode through it (HF_DEEPSEEK_DECODE_ATTENTION=triton) against the default
path; on a GPU the kernels against float64 and FlashMLA, eager and replayed in a CUDA graph."""

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import flash_mla_decode, mla_decode_triton
from hf_deepseek.modeling import latent_cache
from hf_deepseek.modeling.latent_cache import LatentStaticCache

V3_LATENT = dict(hidden_size=256, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                 v_head_dim=64, q_lora_rank=128, initializer_range=0.05)  # fmt: skip


def float64_attention(query, storage, lengths, scale: float, latent: int) -> torch.Tensor:
    out = []
    for b in range(storage.shape[0]):
        keys = storage[b, : int(lengths[b])].double()
        probs = (query[b].double() @ keys.T * scale).softmax(dim=-1)  # [H, S]
        out.append(probs @ keys[:, :latent])
    return torch.stack(out)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(batch, heads, latent, rope, max_len, lengths, device="cpu", dtype=torch.float32):
    storage = torch.randn(batch, max_len, latent + rope, device=device).to(dtype)
    query = torch.randn(batch, heads, latent + rope, device=device).to(dtype)
    return query, storage, torch.tensor(lengths, dtype=torch.int32, device=device), (latent + rope) ** -0.5


@pytest.mark.parametrize(
    "batch,heads,latent,rope,lengths",
    [(1, 2, 32, 16, [40]), (3, 2, 32, 16, [1, 17, 40]), (3, 16, 32, 16, [40, 3, 29]), (3, 16, 512, 64, [5, 40, 22])],
)
def test_op_torch_path_matches_float64(batch, heads, latent, rope, lengths):
    torch.manual_seed(0)
    query, storage, lens, scale = inputs(batch, heads, latent, rope, 40, lengths)
    out = mla_decode_triton.mla_decode_triton(query, storage, lens, scale, latent)
    assert out.shape == (batch, heads, latent) and out.dtype == storage.dtype
    assert relative_error(out, float64_attention(query, storage, lens, scale, latent)) < 1e-5


def fused_inputs(query, latent: int, v: int):
    """The fused form's inputs: the query's latent part, its roped part as a strided tensor of its own, and a W_UV
    [H, v, latent] that is a view of a kv_b-like weight [H, 64 + v, latent] (as `absorbed_weights` gives it)."""
    heads = query.shape[1]
    w_uv = (torch.randn(heads, 64 + v, latent) * latent**-0.5).to(query.dtype)[:, 64:]
    q_rope = query[..., latent:].transpose(0, 1).contiguous().transpose(0, 1)
    return query[..., :latent], q_rope, w_uv


@pytest.mark.parametrize("batch,heads,latent,rope,lengths", [(3, 2, 32, 16, [1, 17, 40]), (2, 16, 512, 64, [5, 40])])
def test_op_fused_form_matches_float64(batch, heads, latent, rope, lengths):
    """The roped query passed apart gives the joined query's output; with W_UV, each head's output through it."""
    torch.manual_seed(0)
    query, storage, lens, scale = inputs(batch, heads, latent, rope, 40, lengths)
    q_latent, q_rope, w_uv = fused_inputs(query, latent, 48)
    want = float64_attention(query, storage, lens, scale, latent)
    apart = mla_decode_triton.mla_decode_triton(q_latent, storage, lens, scale, latent, q_rope)
    assert relative_error(apart, want) < 1e-5
    out = mla_decode_triton.mla_decode_triton(q_latent, storage, lens, scale, latent, q_rope, w_uv)
    assert out.shape == (batch, heads, 48) and out.dtype == storage.dtype
    assert relative_error(out, torch.einsum("bhr,hvr->bhv", want, w_uv.double())) < 1e-5
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mla_decode_triton.mla_decode_triton(
            *(mode.from_tensor(t) for t in (q_latent, storage, lens)), scale, latent,
            *(mode.from_tensor(t) for t in (q_rope, w_uv)),
        )  # fmt: skip
    assert fake.shape == (batch, heads, 48)


def test_op_traces_as_one_node():
    query, storage, lens, scale = inputs(2, 4, 32, 16, 24, [24, 7])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mla_decode_triton.mla_decode_triton(*(mode.from_tensor(t) for t in (query, storage, lens)), scale, 32)
    assert fake.shape == (2, 4, 32)
    compiled = torch.compile(mla_decode_triton.mla_decode_triton, fullgraph=True)
    torch.testing.assert_close(
        compiled(query, storage, lens, scale, 32), mla_decode_triton.reference(query, storage, lens, scale, 32)
    )


def test_model_decode_through_the_op_equals_the_default_path(monkeypatch):
    """HF_DEEPSEEK_DECODE_ATTENTION=triton with the kernels declared usable (on the CPU the op runs its torch
    path): three decode steps' logits equal those of the default path, and the cache layers record the choice."""
    monkeypatch.setattr(mla_decode_triton, "usable", lambda *args: True)
    calls, reference = [], mla_decode_triton.reference
    monkeypatch.setattr(
        mla_decode_triton, "reference", lambda *args: calls.append(args[2].tolist()) or reference(*args)
    )
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 30))
    steps = torch.randint(3, config.vocab_size, (2, 3))
    logits = {}
    for choice in ("triton", "flash", "triton-fused"):
        monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", choice.removesuffix("-fused"))
        monkeypatch.setattr(mla_decode_triton, "FUSED", choice == "triton-fused")
        cache = LatentStaticCache(config, max_cache_len=40)
        cache.unpadded = True
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
            assert all(layer.triton_attention is choice.startswith("triton") for layer in cache.layers[:3])
            logits[choice] = torch.cat([model(steps[:, i : i + 1], cache=cache).logits for i in range(3)], dim=1)
    torch.testing.assert_close(logits["triton"], logits["flash"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits["triton-fused"], logits["flash"], rtol=1e-4, atol=1e-5)
    assert calls == 2 * ([[31, 31]] * 3 + [[32, 32]] * 3 + [[33, 33]] * 3)  # 3 layers a step, one token longer each


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_decode_through_the_op_reads_the_cache_as_one_tensor(monkeypatch, fused):
    """The compiled decode step (as generate() and the bench compile it) through the op (and its fused form, W_UV a
    view of kv_b's weight): one graph for every step,
    no graph break, the eager path's logits, and no two graph inputs over the same memory. A view of the cache that
    is a graph input of its own beside the storage the step writes makes Inductor skip CUDA graphs ("mutated
    inputs"): on an H200 such a step took 14.1 ms against 1.16 (docs/PERF.md, 2026-12-04h)."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    monkeypatch.setattr(mla_decode_triton, "usable", lambda *args: True)
    calls, reference = [], mla_decode_triton.reference
    monkeypatch.setattr(mla_decode_triton, "reference", lambda *args: calls.append(1) or reference(*args))
    monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", "triton")
    monkeypatch.setattr(mla_decode_triton, "FUSED", fused)
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    ids, steps = torch.randint(3, config.vocab_size, (2, 30)), torch.randint(3, config.vocab_size, (2, 4))
    shared_storage = []

    def backend(gm, example_inputs):  # records Dynamo's graph inputs, then runs the graph eagerly
        pointers = [t.untyped_storage().data_ptr() for t in example_inputs if isinstance(t, torch.Tensor)]
        shared_storage.append(len(pointers) - len(set(pointers)))
        return gm.forward

    logits = {}
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
    torch.compiler.reset()
    model.__dict__.pop("_compiled_call", None)
    assert calls, "the op was not called"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert shared_storage == [0]
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-5)


def test_auto_takes_the_triton_kernel_for_small_batches_only(monkeypatch):
    """HF_DEEPSEEK_DECODE_ATTENTION=auto: the Triton kernel up to AUTO_TRITON_MAX_BATCH rows, FlashMLA above; the
    cache's layers record the batch's choice."""
    monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", "auto")
    most = latent_cache.AUTO_TRITON_MAX_BATCH
    assert [latent_cache.decode_attention(b) for b in (1, most, most + 1)] == ["triton", "triton", "flash"]
    monkeypatch.setattr(mla_decode_triton, "usable", lambda *args: True)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    for batch, triton in ((2, True), (most + 1, False)):
        cache = LatentStaticCache(config, max_cache_len=16)
        with torch.no_grad():
            model(torch.randint(3, config.vocab_size, (batch, 4)), cache=cache, use_cache=True)
        assert all(layer.triton_attention is triton for layer in cache.layers[: config.num_hidden_layers])


def test_plan_from_the_environment_is_parsed_and_checked():
    assert mla_decode_triton.parse_plan(None) == mla_decode_triton.parse_plan(" ") == (64, 256)
    assert mla_decode_triton.parse_plan("64, 256") == (64, 256)
    for bad in ("64", "48,128", "8,128", "32,0", "a,b"):
        with pytest.raises(ValueError, match=r"HF_DEEPSEEK_MLA_TRITON_PLAN: expected BLOCK_T,TARGET_PROGRAMS"):
            mla_decode_triton.parse_plan(bad)


def test_unknown_choice_is_refused(monkeypatch):
    monkeypatch.setenv("HF_DEEPSEEK_DECODE_ATTENTION", "fast")
    with pytest.raises(ValueError, match="HF_DEEPSEEK_DECODE_ATTENTION"):
        latent_cache.decode_attention()


@pytest.fixture
def triton_cuda():
    if not (torch.cuda.is_available() and mla_decode_triton.usable(512, 64, torch.bfloat16, torch.device("cuda"))):
        pytest.skip("needs CUDA and Triton")


@pytest.mark.gpu
@pytest.mark.parametrize("batch,heads", [(1, 16), (32, 16), (1, 128)])
def test_kernel_matches_float64_and_flash_mla(triton_cuda, batch, heads):
    torch.manual_seed(0)
    lengths = [2048] if batch == 1 else torch.randint(1, 2049, (batch,)).tolist()
    query, storage, lens, scale = inputs(batch, heads, 512, 64, 2048, lengths, "cuda", torch.bfloat16)
    out = mla_decode_triton.mla_decode_triton(query, storage, lens, scale, 512)
    assert relative_error(out, float64_attention(query, storage, lens, scale, 512)) < 1e-2
    if flash_mla_decode.available() and batch == 1:  # FlashMLA's rows share one length
        length = lens[:1].long()
        flash = flash_mla_decode.flash_latent_attention(query[:, :, None], storage, length, scale)
        assert relative_error(out, flash[:, :, 0]) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_fused_kernels_match_float64(triton_cuda, batch):
    """The roped query read apart and W_UV [H, 128, 512] applied in the combine kernel, bf16, V3's dimensions."""
    torch.manual_seed(0)
    lengths = torch.randint(1, 2049, (batch,)).tolist()
    query, storage, lens, scale = inputs(batch, 16, 512, 64, 2048, lengths, "cuda", torch.bfloat16)
    q_latent, q_rope, w_uv = (t.cuda() for t in fused_inputs(query.cpu(), 512, 128))
    want = float64_attention(query, storage, lens, scale, 512)
    out = mla_decode_triton.mla_decode_triton(q_latent, storage, lens, scale, 512, q_rope, w_uv)
    assert relative_error(out, torch.einsum("bhr,hvr->bhv", want, w_uv.double())) < 2e-2


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph(triton_cuda):
    torch.manual_seed(0)
    query, storage, lens, scale = inputs(2, 16, 512, 64, 2048, [2048, 2048], "cuda", torch.bfloat16)
    mla_decode_triton.mla_decode_triton(query, storage, lens, scale, 512)  # compiles the kernels outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_triton.mla_decode_triton(query, storage, lens, scale, 512)
    for n in ([1, 2048], [100, 101], [1000, 7]):  # the lengths live on the device: one graph, replayed
        lens.copy_(torch.tensor(n, dtype=torch.int32))
        graph.replay()
        assert relative_error(out, float64_attention(query, storage, lens, scale, 512)) < 1e-2
