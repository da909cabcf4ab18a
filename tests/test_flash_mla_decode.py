"""FlashMLA's decode kernel (`kernels/flash_mla_decode.py`, from the optional `sgl-flash-mla` wheel) against a
float64 reference and the torch path it replaces: on an SM90 GPU where the wheel is installed (skipped elsewhere);
on the CPU, the plumbing around it (pages, block table, lengths, the absorbed projections) with the kernel emulated."""

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import flash_mla_decode
from hf_deepseek.modeling import latent_cache
from hf_deepseek.modeling.latent_cache import LatentStaticCache

V3_LATENT = dict(hidden_size=256, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                 v_head_dim=64, q_lora_rank=128, initializer_range=0.05)  # fmt: skip


@pytest.fixture
def flash_mla():
    if not flash_mla_decode.available():
        pytest.skip("sgl-flash-mla is not installed, or this GPU is not SM90")
    latent_cache.DECODE_ATTENTION = "flash"  # the default ("auto") gives small batches the Triton kernel
    yield
    flash_mla_decode.ENABLED = True
    latent_cache.DECODE_ATTENTION = None


def reference(q_latent, q_rope, storage, length: int, scale: float) -> torch.Tensor:
    keys = storage[:, :length].double()  # [B, S, 576]
    query = torch.cat([q_latent, q_rope], dim=-1).double()  # [B, H, 1, 576]
    probs = (torch.einsum("bhtd,bsd->bhts", query, keys) * scale).softmax(dim=-1)
    return torch.einsum("bhts,bsr->bhtr", probs, keys[..., :512])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
def test_flash_decode_matches_float64_eager_and_in_a_cuda_graph(flash_mla):
    torch.manual_seed(0)
    batch, heads, scale = 4, 16, 192**-0.5
    storage = torch.randn(batch, 1024, 576, device="cuda", dtype=torch.bfloat16)
    q_latent = torch.randn(batch, heads, 1, 512, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, heads, 1, 64, device="cuda", dtype=torch.bfloat16)
    length = torch.tensor([777], device="cuda")
    query = torch.cat([q_latent, q_rope], dim=-1)
    out = flash_mla_decode.flash_latent_attention(query, storage, length, scale)
    assert out.shape == (batch, heads, 1, 512)
    assert relative_error(out, reference(q_latent, q_rope, storage, 777, scale)) < 1e-2
    compiled = torch.compile(flash_mla_decode.flash_latent_attention, mode="reduce-overhead", fullgraph=True)
    for n in (100, 101, 1000):  # the length lives on the device: one graph, replayed
        length.fill_(n)
        out = compiled(query, storage, length, scale).clone()
        assert relative_error(out, reference(q_latent, q_rope, storage, n, scale)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
def test_schedule_op_shapes_match_flash_mla(flash_mla, heads):
    """The schedule's fake (what compiled code allocates for it) has the real op's shapes and dtypes."""
    lengths = torch.tensor([3000, 3000, 3000], device="cuda", dtype=torch.int32)
    real = flash_mla_decode.flash_mla_schedule(lengths, heads)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = flash_mla_decode.flash_mla_schedule(mode.from_tensor(lengths), heads)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


@pytest.mark.gpu
def test_model_decode_step_through_flash_equals_the_torch_path(flash_mla):
    """DeepSeek-V3's latent dimensions (512 + 64), 16 heads: a decode step's logits with the cache read by FlashMLA
    and by the torch path (bf16 both; same weights, prompt and token)."""
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).cuda().bfloat16().eval()
    ids = torch.randint(3, config.vocab_size, (2, 50), device="cuda")
    step = torch.randint(3, config.vocab_size, (2, 1), device="cuda")
    logits = {}
    for enabled in (True, False):
        flash_mla_decode.ENABLED = enabled
        cache = LatentStaticCache(config, max_cache_len=60)
        cache.unpadded = True
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
            assert cache.layers[0].flash_mla is enabled
            logits[enabled] = model(step, cache=cache, use_cache=True).logits.float()
    assert relative_error(logits[True], logits[False]) < 2e-2


EMULATED_CALLS = []


SCHEDULES = []


def emulated_schedule(lengths, query_heads):
    """Stands for FlashMLA's scheduler: the lengths it saw, counted per call."""
    SCHEDULES.append(int(lengths[0]))
    return lengths.new_zeros(4, 8), torch.cat([lengths.new_zeros(1), lengths.cumsum(0).to(torch.int32)])


def emulate_flash_mla_on_cpu():
    flash_mla_decode.flash_mla_schedule.register_kernel("cpu")(emulated_schedule)
    flash_mla_decode.flash_mla_decode.register_kernel("cpu")(emulated_kernel)


def emulated_kernel(query, pages, block_table, lengths, schedule, splits, scale):
    """What FlashMLA computes, from its own inputs: each row's pages through the block table, its first `lengths`
    (the schedule only splits the work)."""
    assert torch.equal(splits[1:], lengths.cumsum(0).to(torch.int32)), "a schedule made for other lengths"
    EMULATED_CALLS.append(int(lengths[0]))
    rows = pages[block_table.long()].flatten(1, 2)[:, :, 0]  # [B, pages * 64, 576]
    out = []
    for b in range(query.shape[0]):
        keys = rows[b, : int(lengths[b])]
        probs = (query[b, 0] @ keys.T * scale).softmax(dim=-1)  # [H, S]
        out.append((probs @ keys[:, :512])[None])
    return torch.stack(out)  # [B, 1, H, 512]


def test_flash_path_plumbing_with_the_kernel_emulated_on_cpu():
    emulate_flash_mla_on_cpu()
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 50))
    steps = torch.randint(3, config.vocab_size, (2, 3))
    logits = {}
    for flash in (True, False):
        cache = LatentStaticCache(config, max_cache_len=70)  # storage rounded up to 128 tokens a row
        cache.unpadded = True
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
            for layer in cache.layers:
                layer.flash_mla = flash
            logits[flash] = torch.cat([model(steps[:, i : i + 1], cache=cache).logits for i in range(3)], dim=1)
        assert cache.layers[0].storage.shape[1] == 128
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-5)
    assert EMULATED_CALLS == [51] * 3 + [52] * 3 + [53] * 3  # 3 layers a step, each step one token longer
    assert SCHEDULES == [51, 52, 53]  # one schedule a step, made by the first layer, used by all three


@pytest.mark.parametrize("flash", [True, False], ids=["flash-emulated", "torch-attention"])
def test_compiled_decode_step_reads_the_cache_through_one_input(flash):
    """Inductor replays a compiled step as a CUDA graph only if no two of its inputs alias while one is written
    ("skipping cudagraphs due to mutated inputs": 5x slower decoding on an H200). The decode step's graph, as Dynamo
    hands it to the backend, must take each layer's cache storage once."""
    emulate_flash_mla_on_cpu()
    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([t for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    cache = LatentStaticCache(config, max_cache_len=70)
    cache.unpadded = True
    ids = torch.randint(3, config.vocab_size, (2, 50))
    torch.compiler.reset()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        for layer in cache.layers:
            layer.flash_mla = flash
        torch.compile(model, backend=recording_backend, fullgraph=True)(ids[:, :1], cache=cache, use_cache=True)
    torch.compiler.reset()
    assert len(graphs) == 1
    storages = [t.untyped_storage().data_ptr() for t in graphs[0]]
    written = [layer for layer in cache.layers if layer.is_initialized]  # the MTP layers' stay empty
    assert len(written) == config.num_hidden_layers
    cache_storages = {layer.storage.untyped_storage().data_ptr() for layer in written}
    assert cache_storages <= set(storages)  # the step reads every layer's cache
    assert len(storages) == len(set(storages)), "two inputs of the compiled step share memory"


@pytest.mark.gpu
def test_generate_step_keeps_cuda_graphs_with_flash(flash_mla):
    """The step `generate()` compiles (Inductor, mode "reduce-overhead") over a FlashMLA-read cache is replayed as a
    CUDA graph: Inductor reports no skipped CUDA graph, with FlashMLA reading the cache and without."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).cuda().bfloat16().eval()
    ids = torch.randint(3, config.vocab_size, (2, 40), device="cuda")
    for enabled in (False, True):
        flash_mla_decode.ENABLED = enabled
        torch.compiler.reset()
        model.__dict__.pop("_fast_decode_buffers", None)
        model.__dict__.pop("_fast_decode_step", None)
        counters.clear()
        assert model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False).shape == (2, 52)
        assert model.__dict__["_fast_decode_buffers"].cache.layers[0].flash_mla is enabled  # the device loop ran
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
