"""W_UK and W_UV of decode attention through the per-head Triton kernel (`kernels/head_matmul.py`,
HF_DEEPSEEK_HEAD_MATMUL=1): on the CPU the op's torch path against float64, the absorbed weights' strided views
through it, and a model's decode and compiled decode step through it against the default path; on a GPU the kernel
against float64 at the bench's and DeepSeek-V3's shapes, eager and replayed in a CUDA graph."""

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import head_matmul
from hf_deepseek.modeling.latent_cache import LatentStaticCache

V3_LATENT = dict(hidden_size=256, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                 v_head_dim=32, q_lora_rank=128, initializer_range=0.05)  # fmt: skip


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def absorbed(heads: int, nope: int, v: int, rank: int, device="cpu", dtype=torch.float32):
    """W_UK [H, nope, r] and W_UV [H, v, r] as the attention takes them: views of one [H, nope + v, r] weight."""
    weight = (torch.randn(heads * (nope + v), rank, device=device) * rank**-0.5).to(dtype)
    w = weight.view(heads, nope + v, rank)
    return w[:, :nope], w[:, nope:]


@pytest.mark.parametrize("rows,heads,k,n", [(1, 16, 128, 512), (5, 16, 512, 128), (64, 4, 32, 48)])
def test_op_torch_path_matches_float64(rows, heads, k, n):
    torch.manual_seed(0)
    x, w = torch.randn(rows, heads, k).bfloat16(), torch.randn(heads, k, n).bfloat16()
    out = head_matmul.head_matmul(x, w)
    want = torch.einsum("thk,hkn->thn", x.double(), w.double())
    assert out.shape == (rows, heads, n) and out.dtype == torch.bfloat16
    assert relative_error(out, want) < 4e-3  # one bf16 rounding of fp32 sums


def test_strided_weights_give_the_einsums_results(monkeypatch):
    """absorb_query (with and without the roped part joined on) and values_from_latent through the op (declared
    usable; its torch path on the CPU) equal the einsums they replace, with W_UK and W_UV as the strided views the
    attention passes (W_UV transposed) and q_rope as the strided view the attention holds."""
    torch.manual_seed(0)
    w_uk, w_uv = absorbed(heads=6, nope=32, v=24, rank=64)
    q = torch.randn(3, 1, 6, 48).transpose(1, 2)  # [B, H, 1, nope + rope], as the attention splits it
    q_nope, q_rope = q.split([32, 16], dim=-1)
    latent = torch.randn(3, 6, 1, 64)
    want_q = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
    want_v = torch.einsum("bhtr,hvr->bthv", latent, w_uv)
    calls = []
    monkeypatch.setattr(head_matmul, "ENABLED", True)
    monkeypatch.setattr(head_matmul, "usable", lambda x, w: calls.append((tuple(x.shape), tuple(w.shape))) or True)
    got_q, got_v = head_matmul.absorb_query(q_nope, w_uk), head_matmul.values_from_latent(latent, w_uv)
    joined = head_matmul.absorb_query(q_nope, w_uk, q_rope)
    assert calls == [((3, 6, 32), (6, 32, 64)), ((3, 6, 64), (6, 64, 24)), ((3, 6, 32), (6, 32, 64))]
    assert got_q.shape == want_q.shape and got_v.shape == want_v.shape and joined.shape == (3, 6, 1, 80)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(joined, torch.cat([want_q, q_rope], dim=-1), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(head_matmul, "ENABLED", False)  # torch's einsum and concatenation: the same
    torch.testing.assert_close(head_matmul.absorb_query(q_nope, w_uk, q_rope), joined, rtol=1e-5, atol=1e-6)


def test_the_torch_path_serves_cpu_tensors_even_when_switched_on(monkeypatch):
    monkeypatch.setattr(head_matmul, "ENABLED", True)
    x, w = torch.randn(1, 2, 8).bfloat16(), torch.randn(2, 8, 4).bfloat16()
    assert not head_matmul.usable(x, w)


def test_model_decode_and_compiled_step_through_the_op_equal_the_default_path(monkeypatch):
    """A model's decode steps with the op in every layer's absorbed products (declared usable) give the default
    path's logits, eager and as the compiled step generate() uses: one graph, no graph break."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    torch.manual_seed(0)
    config = tiny_config(**V3_LATENT)
    model = DeepSeekForCausalLM(config).eval()
    ids, steps = torch.randint(3, config.vocab_size, (2, 30)), torch.randint(3, config.vocab_size, (2, 3))
    calls = []
    torch_path = head_matmul.head_matmul

    def run(on: bool, compiled: bool) -> torch.Tensor:
        monkeypatch.setattr(head_matmul, "ENABLED", on)
        cache = LatentStaticCache(config, max_cache_len=40)
        cache.unpadded = True
        step = model.get_compiled_call(CompileConfig(backend="eager", mode=None)) if compiled else model.__call__
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True, recompile_limit=1):
            model(ids, cache=cache, use_cache=True)
            position = torch.arange(30, 33)[None].expand(2, -1)
            return torch.cat([step(input_ids=steps[:, i : i + 1], position_ids=position[:, i : i + 1], cache=cache,
                                   use_cache=True).logits for i in range(3)], dim=1)  # fmt: skip

    monkeypatch.setattr(head_matmul, "usable", lambda x, w: True)
    monkeypatch.setattr(head_matmul, "head_matmul", lambda x, w, tail=None: calls.append(1) or torch_path(x, w, tail))
    default = run(False, False)
    assert not calls
    eager = run(True, False)
    assert len(calls) == 2 * 3 * config.num_hidden_layers  # W_UK and W_UV, 3 steps, every layer
    torch.compiler.reset()
    counters.clear()
    monkeypatch.setattr(head_matmul, "head_matmul", torch_path)  # the custom op itself under compile
    compiled = run(True, True)
    torch.compiler.reset()
    model.__dict__.pop("_compiled_call", None)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(eager, default, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled, default, rtol=1e-4, atol=1e-5)


@pytest.fixture
def triton_cuda():
    from hf_deepseek.kernels.moe_gemv import triton_available

    if not (torch.cuda.is_available() and triton_available()):
        pytest.skip("needs CUDA and Triton")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 32, 64])
@pytest.mark.parametrize("heads", [16, 128])
def test_kernel_matches_float64(triton_cuda, rows, heads):
    from hf_deepseek.kernels._head_matmul_triton import launch

    torch.manual_seed(rows)
    w_uk, w_uv = absorbed(heads, 128, 128, 512, "cuda", torch.bfloat16)
    q, latent = torch.randn(rows, heads, 128, device="cuda").bfloat16(), torch.randn(rows, heads, 512, device="cuda")
    latent = latent.bfloat16()
    for x, w in ((q, w_uk), (latent, w_uv.transpose(1, 2))):
        out = launch(x, w)
        want = torch.einsum("thk,hkn->thn", x.double(), w.double())
        assert out.dtype == torch.bfloat16 and relative_error(out, want) < 4e-3
    rope = torch.randn(rows, heads, 64, device="cuda").bfloat16()
    joined = launch(q, w_uk, rope)  # the roped part copied in by the same launch
    assert joined.shape == (rows, heads, 576) and torch.equal(joined[..., 512:], rope)
    torch.testing.assert_close(joined[..., :512], launch(q, w_uk), rtol=0, atol=0)


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph(triton_cuda):
    from hf_deepseek.kernels._head_matmul_triton import launch

    torch.manual_seed(0)
    w_uk, _ = absorbed(16, 128, 128, 512, "cuda", torch.bfloat16)
    q = torch.randn(1, 16, 128, device="cuda").bfloat16()
    launch(q, w_uk)  # compiles the kernel outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch(q, w_uk)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        graph.replay()
        assert relative_error(out, torch.einsum("thk,hkn->thn", q.double(), w_uk.double())) < 4e-3
