"""Dense layers' decode rows through the matrix-vector kernel (`modeling/decode_linear.py`, the default;
HF_DEEPSEEK_LINEAR_GEMV=0 turns it off): which layers change, that nothing else does, the op's CPU path and its
tracing; on a GPU the kernel's logits against cuBLAS's, and a `generate()` through it."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import graph_recorder, tiny_config
from torch import nn

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import moe_gemv
from hf_deepseek.modeling.decode_linear import DecodeLinear, fused_norm_linear, use_decode_linears
from hf_deepseek.modeling.fp8 import FP8InferenceLinear, FP8Linear, convert_to_fp8_inference, convert_to_fp8_training


def counted_single_row_op(monkeypatch, name: str) -> tuple[list, object]:
    """The matrix-vector kernels declared usable for one row without gradients, and `moe_gemv.<name>` wrapped to
    record each call's row count: (the calls, the op itself)."""
    monkeypatch.setattr(moe_gemv, "usable_linear", lambda rows, w: not torch.is_grad_enabled() and rows.shape[0] == 1)
    calls, original = [], getattr(moe_gemv, name)
    monkeypatch.setattr(moe_gemv, name, lambda *a: calls.append(a[0].shape[0]) or original(*a))
    return calls, original


def assert_kernel_matches(op, launch, args: tuple, want: torch.Tensor) -> None:
    """On the GPU: `op(*args)` within 1e-2 of `want` (float64), and its kernel launch `launch(*args)` captured in a
    CUDA graph and replayed gives the op's result."""
    with torch.no_grad():
        got = op(*args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = launch(*args)
        graph.replay()
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(replayed, got)


def test_switch_off_changes_nothing(monkeypatch):
    if not os.environ.get("HF_DEEPSEEK_LINEAR_GEMV"):
        assert moe_gemv.LINEAR_GEMV  # on by default: measured faster than cuBLAS in a batch-1 step's dense layers
    monkeypatch.setattr(moe_gemv, "LINEAR_GEMV", False)
    model = DeepSeekForCausalLM(tiny_config())
    assert use_decode_linears(model) == 0
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())


def test_switch_on_turns_every_plain_linear_but_the_head(monkeypatch):
    monkeypatch.setattr(moe_gemv, "LINEAR_GEMV", True)
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    keys, want = list(model.state_dict()), model(ids).logits
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear and name != "lm_head"]
    assert use_decode_linears(model) == len(linears) > 0
    assert type(model.lm_head) is nn.Linear
    assert all(type(model.get_submodule(name)) is DecodeLinear for name in linears)
    assert use_decode_linears(model) == 0  # idempotent
    assert list(model.state_dict()) == keys
    assert torch.equal(model(ids).logits, want)  # on the CPU every layer still takes F.linear


def test_fp8_layers_keep_their_own_kernels(monkeypatch):
    monkeypatch.setattr(moe_gemv, "LINEAR_GEMV", True)
    model = convert_to_fp8_inference(DeepSeekForCausalLM(tiny_config(hidden_size=128)).eval())
    before = {name: type(m) for name, m in model.named_modules()}
    assert FP8InferenceLinear in before.values()
    use_decode_linears(model)
    after = {name: type(m) for name, m in model.named_modules()}
    assert {n for n in before if before[n] != after[n]} == {n for n in before if before[n] is nn.Linear} - {"lm_head"}


def test_fp8_conversions_after_the_swap_take_every_layer(monkeypatch):
    """A model whose layers became DecodeLinear (a generate() under the switch) converts to FP8 as before."""
    monkeypatch.setattr(moe_gemv, "LINEAR_GEMV", True)
    config = tiny_config(hidden_size=128)
    plain = {n for n, m in DeepSeekForCausalLM(config).named_modules() if type(m) is nn.Linear and n != "lm_head"}
    for convert, fp8_class in ((convert_to_fp8_training, FP8Linear), (convert_to_fp8_inference, FP8InferenceLinear)):
        model = DeepSeekForCausalLM(config).eval()
        use_decode_linears(model)
        convert(model)
        assert {n for n, m in model.named_modules() if type(m) is fp8_class} == plain


def test_op_on_cpu_and_compiled_through_the_layer(monkeypatch):
    """The op's CPU path is F.linear; a compiled DecodeLinear taking it is one graph with the op as a node."""
    torch.manual_seed(0)
    x, weight = torch.randn(3, 64), torch.randn(48, 64)
    assert torch.equal(moe_gemv.linear_gemv(x, weight), F.linear(x, weight))
    layer = nn.Linear(64, 48, bias=True)
    layer.__class__ = DecodeLinear
    monkeypatch.setattr(moe_gemv, "usable_linear", lambda rows, w: rows.shape[0] <= moe_gemv.MAX_LINEAR_ROWS)
    calls = []
    original = moe_gemv.linear_gemv
    monkeypatch.setattr(moe_gemv, "linear_gemv", lambda *a: calls.append(a[0].shape) or original(*a))
    with torch.no_grad():
        x3 = torch.randn(1, 2, 64)
        torch.testing.assert_close(layer(x3), F.linear(x3, layer.weight, layer.bias))
        assert calls == [torch.Size([2, 64])]
        many = torch.randn(1, 9, 64)  # more rows than MAX_LINEAR_ROWS: F.linear
        torch.testing.assert_close(layer(many), F.linear(many, layer.weight, layer.bias))
        assert len(calls) == 1
    monkeypatch.setattr(moe_gemv, "linear_gemv", original)
    backend, graphs = graph_recorder()

    with torch.no_grad():
        out = torch.compile(layer, backend=backend, fullgraph=True)(x3)
    torch.testing.assert_close(out, F.linear(x3, layer.weight, layer.bias))
    assert len(graphs) == 1 and "linear_gemv" in str(graphs[0].graph)


@pytest.mark.gpu
def test_decode_logits_through_the_kernel_match_cublas_on_gpu(monkeypatch):
    if not (torch.cuda.is_available() and moe_gemv.triton_available()):
        pytest.skip("needs Triton and CUDA")
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(hidden_size=256, intermediate_size=512)).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 1), device="cuda")
    with torch.no_grad():
        want = model(ids).logits.float()
        monkeypatch.setattr(moe_gemv, "LINEAR_GEMV", True)
        assert use_decode_linears(model) > 0
        got = model(ids).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert not moe_gemv.usable_linear(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16), model.lm_head.weight)


@pytest.mark.gpu
def test_generate_through_the_kernel_on_gpu(monkeypatch):
    """generate()'s compiled device loop with the dense layers through the kernel: it runs (no fallback to
    transformers' loop) and its greedy tokens start as cuBLAS's do."""
    if not (torch.cuda.is_available() and moe_gemv.triton_available()):
        pytest.skip("needs Triton and CUDA")
    from hf_deepseek.generation import fast_generate

    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, intermediate_size=512)
    ids = torch.randint(3, config.vocab_size, (1, 12), device="cuda")
    outputs, loop_tokens = {}, []
    original = fast_generate.try_fast_generate

    def recorded(*args):
        loop_tokens.append(original(*args))
        return loop_tokens[-1]

    monkeypatch.setattr(fast_generate, "try_fast_generate", recorded)
    for on in (False, True):
        monkeypatch.setattr(moe_gemv, "LINEAR_GEMV", on)
        torch.manual_seed(1)
        model = DeepSeekForCausalLM(config).cuda().to(torch.bfloat16).eval()
        loop_tokens.clear()
        outputs[on] = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert loop_tokens and loop_tokens[0] is not None, "the device loop fell back to transformers' loop"
        assert any(isinstance(m, DecodeLinear) for m in model.modules()) == on
    assert outputs[True].shape == outputs[False].shape == (1, 20)
    assert torch.equal(outputs[True][:, :13], outputs[False][:, :13])


def test_fused_gate_up_op_and_the_mlp_taking_it(monkeypatch):
    """`gate_up_gemv` on the CPU: SiLU(x gate^T) * (x up^T) from fp32 sums, rounded once; a SwiGLU MLP of DecodeLinear
    layers takes it for its single decode row with HF_DEEPSEEK_FUSED_GATE_UP on (the default) (one op node under
    torch.compile), keeps its three projections otherwise, and gives the unfused result within bf16 rounding."""
    from hf_deepseek.modeling.layers import SwiGLUMLP

    torch.manual_seed(0)
    x, gate, up = (torch.randn(r, 64).to(torch.bfloat16) for r in (1, 48, 48))
    want = F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    got = moe_gemv.gate_up_gemv(x, gate, up)
    assert got.dtype == torch.bfloat16 and ((got.double() - want).norm() / want.norm()).item() < 4e-3
    assert torch.equal(got, (F.silu(x.float() @ gate.float().T) * (x.float() @ up.float().T)).to(torch.bfloat16))

    mlp = SwiGLUMLP(64, 48).to(torch.bfloat16)
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        layer.__class__ = DecodeLinear
    calls, original = counted_single_row_op(monkeypatch, "gate_up_gemv")
    monkeypatch.setattr(moe_gemv, "FUSED_GATE_UP", False)
    x3 = torch.randn(1, 1, 64).to(torch.bfloat16)
    with torch.no_grad():
        unfused = mlp(x3)
        assert calls == []  # switched off
        monkeypatch.setattr(moe_gemv, "FUSED_GATE_UP", True)
        fused = mlp(x3)
        assert calls == [1] and fused.shape == (1, 1, 64)
        torch.testing.assert_close(fused, unfused, rtol=2e-2, atol=2e-2)
        mlp(torch.randn(1, 3, 64).to(torch.bfloat16))  # three rows: the projections
        assert calls == [1]
    monkeypatch.setattr(moe_gemv, "gate_up_gemv", original)
    backend, graphs = graph_recorder()

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mlp, backend=backend, fullgraph=True)(x3), fused)
    assert len(graphs) == 1 and "gate_up_gemv" in str(graphs[0].graph)


@pytest.mark.gpu
def test_fused_gate_up_kernel_matches_float64_on_gpu():
    """The gate/up kernel over a SwiGLU MLP's two matrices (one decode row) at the bench's shared-expert and dense
    MLP shapes, against float64; and replayed in a CUDA graph."""
    if not (torch.cuda.is_available() and moe_gemv.triton_available()):
        pytest.skip("needs Triton and CUDA")
    from hf_deepseek.kernels import _moe_gemv_triton

    torch.manual_seed(0)
    for inter, dim in ((2816, 2048), (10944, 2048), (200, 320)):
        x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
        gate, up = ((torch.randn(inter, dim, device="cuda") / dim**0.5).to(torch.bfloat16) for _ in range(2))
        want = F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)
        assert_kernel_matches(moe_gemv.gate_up_gemv, _moe_gemv_triton.launch_gate_up, (x, gate, up), want)


@pytest.mark.gpu
def test_fp8_gate_up_kernel_matches_float64_on_gpu():
    """The gate/up kernel over a SwiGLU MLP's two FP8 layers (each with its own 128x128 block scales; 1 and 4
    decode rows) at the bench's dense MLP shape and a partial-block one, against float64 with the dequantised
    weights; and replayed in a CUDA graph."""
    if not (torch.cuda.is_available() and moe_gemv.fp8_kernels_available()):
        pytest.skip("needs Triton, CUDA and FP8 conversions")
    from hf_deepseek.kernels import _moe_gemv_triton
    from hf_deepseek.kernels.fp8_blocks import dequantize_blocks
    from hf_deepseek.modeling.fp8_numerics import quantize_blocks

    torch.manual_seed(0)
    for rows, inter, dim in ((1, 10944, 2048), (4, 200, 320)):
        x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
        gate, up = (quantize_blocks(torch.randn(inter, dim, device="cuda") / dim**0.5) for _ in range(2))
        g, u = (x.double() @ dequantize_blocks(q, s).double().T for q, s in (gate, up))
        args = (x, gate[0], gate[1], up[0], up[1])

        def launch(x, gq, gs, uq, us):
            return _moe_gemv_triton.launch_gate_up(x, gq, uq, gate_scale=gs, up_scale=us)

        assert_kernel_matches(moe_gemv.gate_up_gemv_fp8, launch, args, F.silu(g) * u)


def test_q_kv_a_pair_op_and_the_attention_taking_it(monkeypatch):
    """`linear_gemv_pair` on the CPU: both products joined; an attention whose q_a and kv_a projections are
    DecodeLinear takes it for its single decode row (the default; one op node under torch.compile) and gives the
    unfused result; switched off (HF_DEEPSEEK_FUSED_Q_KV_A=0), or for several rows, the two projections."""
    from hf_deepseek.modeling.attention import MultiHeadLatentAttention

    torch.manual_seed(0)
    x, first, second = (torch.randn(r, 64).to(torch.bfloat16) for r in (1, 48, 40))
    got = moe_gemv.linear_gemv_pair(x, first, second)
    assert got.shape == (1, 88) and torch.equal(got, torch.cat([F.linear(x, first), F.linear(x, second)], -1))

    config = tiny_config(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32)
    attention = MultiHeadLatentAttention(config, 0).to(torch.bfloat16).eval()
    for layer in (attention.q_a_proj, attention.kv_a_proj_with_mqa):
        layer.__class__ = DecodeLinear
    calls, original = counted_single_row_op(monkeypatch, "linear_gemv_pair")
    monkeypatch.setattr(moe_gemv, "FUSED_Q_KV_A", False)
    hidden = torch.randn(1, 1, 64).to(torch.bfloat16)
    with torch.no_grad():
        unfused = attention._input_projections(hidden)
        assert calls == []  # switched off
        monkeypatch.setattr(moe_gemv, "FUSED_Q_KV_A", True)
        fused = attention._input_projections(hidden)
        assert calls == [1] and [t.shape for t in fused] == [(1, 1, 32), (1, 1, 32 + config.qk_rope_head_dim)]
        for a, b in zip(fused, unfused, strict=True):
            assert torch.equal(a, b)
        attention._input_projections(torch.randn(1, 3, 64).to(torch.bfloat16))  # three rows: the projections
        assert calls == [1]
    monkeypatch.setattr(moe_gemv, "linear_gemv_pair", original)
    backend, graphs = graph_recorder()
    with torch.no_grad():
        compiled = torch.compile(attention._input_projections, backend=backend, fullgraph=True)(hidden)
    for a, b in zip(compiled, fused, strict=True):
        assert torch.equal(a, b)
    assert len(graphs) == 1 and "linear_gemv_pair" in str(graphs[0].graph)


@pytest.mark.gpu
def test_q_kv_a_pair_kernel_matches_float64_on_gpu():
    """The pair kernel at the bench's q_a and kv_a shapes (and partial blocks), against float64; replayed in a CUDA
    graph."""
    if not (torch.cuda.is_available() and moe_gemv.triton_available()):
        pytest.skip("needs Triton and CUDA")
    from hf_deepseek.kernels import _moe_gemv_triton

    torch.manual_seed(0)
    for n1, n2, dim in ((1536, 576, 2048), (1536, 576, 7168), (100, 36, 320)):
        x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
        first, second = ((torch.randn(n, dim, device="cuda") / dim**0.5).to(torch.bfloat16) for n in (n1, n2))
        want = torch.cat([x.double() @ first.double().T, x.double() @ second.double().T], dim=-1)
        op, launch = moe_gemv.linear_gemv_pair, _moe_gemv_triton.launch_linear_pair
        assert_kernel_matches(op, launch, (x, first, second), want)


def test_norm_linear_op_and_the_attention_taking_it(monkeypatch):
    """`norm_linear_gemv` on the CPU: RMSNorm's computation (fp32, rounded to x's dtype, times the weight) then the
    product, equal to the two modules; the attention's q_a norm and q_b projection take it for a single decode row
    with HF_DEEPSEEK_FUSED_NORM_LINEAR on (the default) and give the unfused q; one op node under torch.compile."""
    from hf_deepseek.modeling.attention import MultiHeadLatentAttention
    from hf_deepseek.modeling.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = torch.rand(64).to(torch.bfloat16) + 0.5
    x, weight = torch.randn(1, 64).to(torch.bfloat16), torch.randn(48, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(moe_gemv.norm_linear_gemv(x, norm.weight, norm.eps, weight), F.linear(norm(x), weight))

    config = tiny_config(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32)
    attention = MultiHeadLatentAttention(config, 0).to(torch.bfloat16).eval()
    attention.q_b_proj.__class__ = DecodeLinear
    calls, original = counted_single_row_op(monkeypatch, "norm_linear_gemv")
    q_a = torch.randn(1, 1, 32).to(torch.bfloat16)
    unfused = attention.q_b_proj(attention.q_a_layernorm(q_a))
    monkeypatch.setattr(moe_gemv, "FUSED_NORM_LINEAR", True)
    with torch.no_grad():
        fused = fused_norm_linear(attention.q_a_layernorm, attention.q_b_proj, q_a)
        assert calls == [1] and torch.equal(fused, unfused)
        assert fused_norm_linear(attention.q_a_layernorm, attention.q_b_proj, torch.randn(1, 3, 32)) is None
    monkeypatch.setattr(moe_gemv, "norm_linear_gemv", original)
    backend, graphs = graph_recorder()
    with torch.no_grad():
        compiled = torch.compile(fused_norm_linear, backend=backend, fullgraph=True)
        assert torch.equal(compiled(attention.q_a_layernorm, attention.q_b_proj, q_a), unfused)
    assert len(graphs) == 1 and "norm_linear_gemv" in str(graphs[0].graph)


def test_input_norm_pair_op_and_the_model_taking_it(monkeypatch):
    """`norm_linear_gemv_pair` on the CPU: RMSNorm's computation, then both products joined, equal to the modules;
    with HF_DEEPSEEK_FUSED_INPUT_NORM on (the default) each decoder layer hands its input norm to the attention, whose
    decode row takes the op once a layer, and the model's logits are the unfused path's (=0) bit for bit; one op node
    a layer under torch.compile."""
    from hf_deepseek.modeling.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = torch.rand(64).to(torch.bfloat16) + 0.5
    x, first, second = (torch.randn(r, 64).to(torch.bfloat16) for r in (1, 48, 40))
    with torch.no_grad():
        got = moe_gemv.norm_linear_gemv_pair(x, norm.weight, norm.eps, first, second)
        assert torch.equal(got, torch.cat([F.linear(norm(x), first), F.linear(norm(x), second)], -1))

    config = tiny_config(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32)
    model = DeepSeekForCausalLM(config).to(torch.bfloat16).eval()
    use_decode_linears(model)
    calls, original = counted_single_row_op(monkeypatch, "norm_linear_gemv_pair")
    token = torch.tensor([[5]])
    with torch.no_grad():
        monkeypatch.setattr(moe_gemv, "FUSED_INPUT_NORM", False)
        unfused = model(token).logits
        assert calls == []
        monkeypatch.setattr(moe_gemv, "FUSED_INPUT_NORM", True)
        fused = model(token).logits
        assert calls == [1] * config.num_hidden_layers and torch.equal(fused, unfused)
        model(torch.tensor([[5, 6, 7]]))  # three rows: the norm, then the projections, as before
        assert calls == [1] * config.num_hidden_layers
    monkeypatch.setattr(moe_gemv, "norm_linear_gemv_pair", original)
    backend, graphs = graph_recorder()
    with torch.no_grad():
        compiled = torch.compile(model.model.layers[0].self_attn._input_projections, backend=backend, fullgraph=True)
        hidden = torch.randn(1, 1, 64).to(torch.bfloat16)
        projected = compiled(hidden, model.model.layers[0].input_layernorm)
        want = model.model.layers[0].self_attn._input_projections(model.model.layers[0].input_layernorm(hidden))
    for a, b in zip(projected, want, strict=True):
        assert torch.equal(a, b)
    assert len(graphs) == 1 and "norm_linear_gemv_pair" in str(graphs[0].graph)


@pytest.mark.gpu
def test_input_norm_pair_kernel_matches_float64_on_gpu():
    """The norm-prologue pair kernel at the bench's q_a and kv_a shapes (and partial blocks), bf16 and FP8 weights,
    against RMSNorm then the products in float64; replayed in a CUDA graph."""
    if not (torch.cuda.is_available() and moe_gemv.triton_available()):
        pytest.skip("needs Triton and CUDA")
    from hf_deepseek.kernels import _moe_gemv_triton
    from hf_deepseek.kernels.fp8_blocks import dequantize_blocks
    from hf_deepseek.modeling.fp8_numerics import quantize_blocks

    torch.manual_seed(0)
    launch = _moe_gemv_triton.launch_norm_linear_pair
    for n1, n2, dim in ((1536, 576, 2048), (100, 36, 320)):
        x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
        g = (torch.rand(dim, device="cuda") + 0.5).to(torch.bfloat16)
        first, second = ((torch.randn(n, dim, device="cuda") / dim**0.5).to(torch.bfloat16) for n in (n1, n2))
        normed = moe_gemv.rms_norm(x, g, 1e-6).double()
        want = torch.cat([normed @ first.double().T, normed @ second.double().T], dim=-1)
        assert_kernel_matches(moe_gemv.norm_linear_gemv_pair, launch, (x, g, 1e-6, first, second), want)
        (q1, s1), (q2, s2) = quantize_blocks(first), quantize_blocks(second)
        want = torch.cat([normed @ dequantize_blocks(q, sc).double().T for q, sc in ((q1, s1), (q2, s2))], dim=-1)
        op = moe_gemv.norm_linear_gemv_pair_fp8

        def launch_fp8(x, g, eps, q1, s1, q2, s2):
            return launch(x, g, eps, q1, q2, first_scale=s1, second_scale=s2)

        assert_kernel_matches(op, launch_fp8, (x, g, 1e-6, q1, s1, q2, s2), want)


@pytest.mark.gpu
def test_norm_linear_kernel_matches_the_unfused_path_on_gpu():
    """The norm-prologue kernel at the bench's q_b shape (the q_a output a strided slice of the q_a/kv_a pair's
    output), against RMSNorm then the product in float64, and replayed in a CUDA graph."""
    if not (torch.cuda.is_available() and moe_gemv.triton_available()):
        pytest.skip("needs Triton and CUDA")
    from hf_deepseek.kernels import _moe_gemv_triton

    torch.manual_seed(0)
    joined = torch.randn(1, 1536 + 576, device="cuda", dtype=torch.bfloat16)
    x = joined[:, :1536]  # row stride 2112
    g = (torch.rand(1536, device="cuda") + 0.5).to(torch.bfloat16)
    weight = (torch.randn(3072, 1536, device="cuda") / 1536**0.5).to(torch.bfloat16)
    want = moe_gemv.rms_norm(x, g, 1e-6).double() @ weight.double().T
    op, launch = moe_gemv.norm_linear_gemv, _moe_gemv_triton.launch_norm_linear
    assert_kernel_matches(op, launch, (x, g, 1e-6, weight), want)
