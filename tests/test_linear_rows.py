"""The rows kernel for a linear layer's few dozen decode rows (`kernels/linear_rows.py`), FP8 weights (weight-only)
and bf16 ones: the ops' torch computation against float64 on the CPU, their fake kernels under torch.compile, the
dispatch of `FP8InferenceLinear` between the matrix-vector op, this op and the FP8 GEMM path, and of `DecodeLinear`
(opt-in), the launch configuration; on a GPU the Triton kernel against float64 and the ops' torch path at the
bench's shapes, and its replay in a CUDA graph."""

import types

import pytest
import torch
from conftest import graph_recorder
from test_moe_gemv import fp8_linear_layer

from hf_deepseek.kernels import linear_rows, moe_gemv, moe_gemv_config
from hf_deepseek.kernels.moe_gemv_config import GroupedConfig


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm()).item()


def float64_product(layer, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T in float64, W the layer's exact dequantised weight (no bias)."""
    return x.double() @ layer.dequantized(torch.float64).weight.T.to(x.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,in_features,out_features", [(5, 320, 200), (32, 1408, 136), (64, 256, 256)])
def test_op_is_the_product_with_the_dequantised_weight_on_the_cpu(rows, in_features, out_features, dtype):
    """Partial 128-blocks in both dimensions (320, 200, 1408, 136) and whole ones; the fp32 sums rounded once to x's
    dtype."""
    layer = fp8_linear_layer("cpu", in_features, out_features)
    x = torch.randn(rows, in_features).to(dtype)
    with torch.no_grad():
        out = linear_rows.linear_rows_fp8(x, layer.weight, layer.weight_scale_inv)
    want = float64_product(layer, x)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    else:
        assert relative_error(out, want) < 1e-2
        assert torch.equal(out, (x.float() @ layer.dequantized(torch.float32).weight.T).to(dtype))
    assert not linear_rows.usable_fp8(x, layer.weight)  # CUDA only


def test_op_traces_as_one_node_with_its_fake_kernel():
    """Under torch.compile (fullgraph) the op is one node, traced through its fake kernel (x's dtype, [T, N])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = fp8_linear_layer("cpu", 320, 200)
    x = torch.randn(33, 320).to(torch.bfloat16)
    backend, graphs = graph_recorder()

    with torch.no_grad():
        eager = linear_rows.linear_rows_fp8(x, layer.weight, layer.weight_scale_inv)
        compiled = torch.compile(linear_rows.linear_rows_fp8, backend=backend, fullgraph=True)
        assert torch.equal(compiled(x, layer.weight, layer.weight_scale_inv), eager)
    calls = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert calls == [torch.ops.hf_deepseek.linear_rows_fp8.default]
    with FakeTensorMode() as mode:
        fake_args = (mode.from_tensor(t) for t in (x, layer.weight, layer.weight_scale_inv))
        fake = torch.ops.hf_deepseek.linear_rows_fp8(*fake_args)
    assert fake.shape == (33, 200) and fake.dtype == torch.bfloat16


def test_usable_fp8_between_the_matrix_vector_rows_and_max_rows(monkeypatch):
    """`usable_fp8`'s own conditions, with a CUDA-looking x2: more than MAX_LINEAR_ROWS and up to MAX_ROWS bf16 or fp16
    rows of an FP8 weight, without grad, with the kernels enabled."""
    weight = types.SimpleNamespace(dtype=torch.float8_e4m3fn)

    def rows(count, dtype=torch.bfloat16):
        return types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(count, 256))

    monkeypatch.setattr(moe_gemv, "fp8_kernels_available", lambda: True)
    limits = (
        1,
        moe_gemv.MAX_LINEAR_ROWS,
        moe_gemv.MAX_LINEAR_ROWS + 1,
        32,
        linear_rows.MAX_ROWS,
        linear_rows.MAX_ROWS + 1,
    )
    with torch.no_grad():
        assert [linear_rows.usable_fp8(rows(r), weight) for r in limits] == [False, False, True, True, True, False]
        assert linear_rows.usable_fp8(rows(32, torch.float16), weight)
        assert not linear_rows.usable_fp8(rows(32, torch.float32), weight)
        assert not linear_rows.usable_fp8(rows(32), types.SimpleNamespace(dtype=torch.bfloat16))
        monkeypatch.setattr(moe_gemv, "ENABLED", False)
        assert not linear_rows.usable_fp8(rows(32), weight)
    monkeypatch.setattr(moe_gemv, "ENABLED", True)
    assert not linear_rows.usable_fp8(rows(32), weight)  # grad mode on: training never takes it
    monkeypatch.setattr(moe_gemv, "fp8_kernels_available", lambda: False)
    with torch.no_grad():
        assert not linear_rows.usable_fp8(rows(32), weight)


def test_fp8_linear_takes_the_rows_op_between_the_matrix_vector_rows_and_max_rows(monkeypatch):
    """FP8InferenceLinear.forward: 1-4 rows the matrix-vector op, 5-64 this op (leading dimensions kept, bias added),
    more the FP8 GEMM path (activations quantised per 1x128 tile), with the device checks passed on the CPU."""
    layer = fp8_linear_layer("cpu")
    calls = []
    gemv, rows_op = moe_gemv.linear_gemv_fp8, linear_rows.linear_rows_fp8
    grad, gemv_rows = torch.is_grad_enabled, moe_gemv.MAX_LINEAR_ROWS
    monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, w: not grad() and x2.shape[0] <= gemv_rows)
    monkeypatch.setattr(
        linear_rows, "usable_fp8", lambda x2, w: not grad() and gemv_rows < x2.shape[0] <= linear_rows.MAX_ROWS
    )
    monkeypatch.setattr(moe_gemv, "linear_gemv_fp8", lambda *a: calls.append(("gemv", a[0].shape[0])) or gemv(*a))
    monkeypatch.setattr(linear_rows, "linear_rows_fp8", lambda *a: calls.append(("rows", a[0].shape[0])) or rows_op(*a))
    taken = {}
    with torch.no_grad():
        for count in (1, 4, 5, 32, 64, 65):
            x = torch.randn(1, count, 320)
            calls.clear()
            out = layer(x)
            taken[count] = calls[0][0] if calls else "gemm"
            assert out.shape == (1, count, 200)
            if taken[count] == "rows":
                want = rows_op(x[0], layer.weight, layer.weight_scale_inv) + layer.bias
                assert calls == [("rows", count)] and torch.equal(out[0], want)
                layer.fp8_recipe = type(layer.fp8_recipe)(weight_only_decode=False)
                gemm_path = layer(x)
                layer.fp8_recipe = type(layer.fp8_recipe)()
                assert 1e-4 < relative_error(out, gemm_path) < 0.05  # the GEMM path quantises the activations
    assert taken == {1: "gemv", 4: "gemv", 5: "rows", 32: "rows", 64: "rows", 65: "gemm"}
    calls.clear()
    layer(torch.randn(32, 320))  # grad mode on: the GEMM path
    assert calls == []


@pytest.mark.parametrize("rows,in_features,out_features", [(2, 320, 200), (32, 1408, 136)])
def test_bf16_op_is_the_product_in_fp32_rounded_once_on_the_cpu(rows, in_features, out_features):
    torch.manual_seed(0)
    weight = (torch.randn(out_features, in_features) / in_features**0.5).to(torch.bfloat16)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    with torch.no_grad():
        out = linear_rows.linear_rows(x, weight)
    want = x.double() @ weight.double().T
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    assert relative_error(out, want) < 4e-3  # one bf16 rounding of fp32 sums
    assert torch.equal(out, (x.float() @ weight.float().T).to(torch.bfloat16))


def test_decode_linear_takes_the_rows_op_only_when_opted_in(monkeypatch):
    """DecodeLinear: one row the matrix-vector op; 2-64 rows the rows op with HF_DEEPSEEK_LINEAR_ROWS=1
    (`linear_rows.BF16`), cuBLAS's F.linear otherwise and above 64 (the ops' own conditions, rows seen as CUDA)."""
    from hf_deepseek.modeling.decode_linear import DecodeLinear

    torch.manual_seed(0)
    layer = torch.nn.Linear(320, 200).to(torch.bfloat16)
    layer.__class__ = DecodeLinear

    def as_cuda(usable):
        return lambda x2, w: usable(types.SimpleNamespace(is_cuda=True, dtype=x2.dtype, shape=x2.shape), w)

    calls, gemv_op, rows_op = [], moe_gemv.linear_gemv, linear_rows.linear_rows
    monkeypatch.setattr(moe_gemv, "triton_available", lambda: True)
    monkeypatch.setattr(moe_gemv, "usable_linear", as_cuda(moe_gemv.usable_linear))
    monkeypatch.setattr(linear_rows, "usable", as_cuda(linear_rows.usable))
    monkeypatch.setattr(moe_gemv, "linear_gemv", lambda x, w: calls.append("gemv") or gemv_op(x, w))
    monkeypatch.setattr(linear_rows, "linear_rows", lambda x, w: calls.append("rows") or rows_op(x, w))
    taken = {}
    for opted_in in (False, True):
        monkeypatch.setattr(linear_rows, "BF16", opted_in)
        for count in (1, 2, 32, 64, 65):
            calls.clear()
            x = torch.randn(count, 1, 320).to(torch.bfloat16)
            with torch.no_grad():
                out = layer(x)
            taken[opted_in, count] = calls[0] if calls else "cublas"
            assert out.shape == (count, 1, 200)
            if calls == ["rows"]:
                assert torch.equal(out[:, 0], rows_op(x[:, 0], layer.weight) + layer.bias)
    assert taken == {
        (False, 1): "gemv", (False, 2): "cublas", (False, 32): "cublas", (False, 64): "cublas", (False, 65): "cublas",
        (True, 1): "gemv", (True, 2): "rows", (True, 32): "rows", (True, 64): "rows", (True, 65): "cublas",
    }  # fmt: skip
    calls.clear()
    layer(torch.randn(32, 320).to(torch.bfloat16))  # grad mode on: cuBLAS
    assert calls == []


def test_config_parsing_and_checks():
    """The rows kernel's configuration: the grouped kernels' fields and FP8 checks, its own default and variable."""
    assert moe_gemv_config.linear_rows_config(None) == moe_gemv_config.LINEAR_ROWS_CONFIG
    assert moe_gemv_config.linear_rows_config((4, 16, 128, 4)) == GroupedConfig(4, 16, 128, 4, None)
    assert moe_gemv_config.linear_rows_config((4, 8, 32, 2)) == GroupedConfig(4, 8, 32, 2, None)  # broadcast: any tile
    assert moe_gemv_config.linear_rows_config(None, fp8=True) == moe_gemv_config.LINEAR_ROWS_FP8_CONFIG
    assert moe_gemv_config.linear_rows_config((32, 16, 256, 4)) == GroupedConfig(32, 16, 256, 4, None)  # bf16: any K
    form = "expected BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES] (integers, the last may be none)"
    errors = {
        "32,16,128": f"{form}, got '32,16,128'",
        "32,16,128,4,3,1": f"{form}, got '32,16,128,4,3,1'",
        "32,16,128,four": f"{form}, got '32,16,128,four'",
        "32,16,none,4": f"{form}, got '32,16,none,4'",
        "24,16,128,4": "block_t must be a power of two, got 24",
        "32,16,128,0": "warps must be a power of two, got 0",
    }
    for text, message in errors.items():
        with pytest.raises(ValueError) as raised:
            moe_gemv_config.parse_grouped_config(text)
        assert str(raised.value) == message
    with pytest.raises(ValueError, match="FP8 weights need BLOCK_N and BLOCK_K dividing the 128x128 scale blocks"):
        moe_gemv_config.linear_rows_config((32, 16, 256, 4), fp8=True)
    with pytest.raises(ValueError, match=r"tl.dot \(BLOCK_T >= 16\) needs BLOCK_N and BLOCK_K >= 16"):
        moe_gemv_config.linear_rows_config((16, 8, 128, 4), fp8=True)
    env = {"HF_DEEPSEEK_LINEAR_ROWS_FP8_CONFIG": "16,32,64,4"}
    got = moe_gemv_config.config_from_env(
        env, default=moe_gemv_config.UNTUNED_LINEAR_ROWS, names=tuple(env), parse=moe_gemv_config.parse_grouped_config
    )
    assert got == GroupedConfig(16, 32, 64, 4, None)


# GPU: the Triton kernel at the bench's dense-layer shapes (hidden 2048), decode rows 5 to 64

BENCH_SHAPES = [(2048, 1536), (2048, 576), (2048, 3072), (2048, 2048), (1408, 2048)]  # (K, N)
VARIANTS = [None, (16, 32, 64, 4, 2), (64, 16, 128, 4, 3), (4, 16, 128, 4, None)]


def gpu_case(k: int, n: int, rows: int, dtype=torch.bfloat16):
    if not moe_gemv.fp8_kernels_available():
        pytest.skip("needs Triton and a CUDA GPU with FP8")
    layer = fp8_linear_layer("cuda", k, n)
    return layer, torch.randn(rows, k, device="cuda", dtype=dtype)


def assert_rounded_as_the_torch_path(got: torch.Tensor, layer, x: torch.Tensor) -> None:
    """The kernel's bf16 against the op's torch path (fp32 sums in another order, rounded once): equal but for
    sums within an fp32 rounding of a bf16 midpoint, and those one bf16 step apart."""
    want = linear_rows.linear_rows_fp8(x.cpu(), layer.weight.cpu(), layer.weight_scale_inv.cpu())
    got = got.cpu()
    differ = got != want
    assert differ.float().mean().item() < 1e-3, differ.sum().item()
    steps = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)
    assert (steps[differ] <= 2**-7).all()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [5, 16, 32, 33, 64])
@pytest.mark.parametrize("k,n", BENCH_SHAPES)
def test_triton_kernel_matches_float64_and_the_torch_path(k, n, rows):
    layer, x = gpu_case(k, n, rows)
    with torch.no_grad():
        assert linear_rows.usable_fp8(x, layer.weight)
        out = linear_rows.linear_rows_fp8(x, layer.weight, layer.weight_scale_inv)
        want = float64_product(layer, x)
        sums = linear_rows.linear_rows_fp8(x.float(), layer.weight, layer.weight_scale_inv)
    assert not linear_rows.usable_fp8(x, layer.weight)  # grad mode on
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    error = relative_error(out, want)
    assert error < 1e-2, error
    assert relative_error(sums, want) < 1e-5  # fp32 rows: fp32 products and sums ("ieee", not TF32)
    assert_rounded_as_the_torch_path(out, layer, x)


@pytest.mark.gpu
@pytest.mark.parametrize("config", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_variants_match_float64(config, dtype):
    from hf_deepseek.kernels import _linear_rows_triton

    layer, x = gpu_case(1408, 576, 33, dtype)
    with torch.no_grad():
        out = _linear_rows_triton.launch(x, layer.weight, layer.weight_scale_inv, config)
        want = float64_product(layer, x)
    assert out.dtype == dtype and relative_error(out, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 32, 64])
@pytest.mark.parametrize("k,n", BENCH_SHAPES)
def test_triton_kernel_with_bf16_weights_matches_float64(k, n, rows):
    if not moe_gemv.triton_available():
        pytest.skip("needs Triton and CUDA")
    torch.manual_seed(0)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = linear_rows.linear_rows(x, weight)
    want = x.double() @ weight.double().T
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert relative_error(out, want) < 1e-2
    cpu = linear_rows.linear_rows(x.cpu(), weight.cpu())
    assert (out.cpu() != cpu).float().mean().item() < 1e-3  # fp32 sums in another order, rounded once


@pytest.mark.gpu
def test_fp8_linear_takes_the_kernel_at_batch_32():
    layer, x = gpu_case(2048, 1536, 32)
    with torch.no_grad():
        assert linear_rows.usable_fp8(x, layer.weight) and not moe_gemv.usable_linear_fp8(x, layer.weight)
        out = layer(x[:, None])  # [32, 1, 2048]: a decode step's rows
        want = float64_product(layer, x) + layer.bias.double()
    assert out.shape == (32, 1, 1536) and relative_error(out[:, 0], want) < 1e-2


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph():
    """Captured once (a grid fixed by the shapes, no host read), replayed after x changes in place: the eager result
    of the new rows; the op compiled with CUDA graphs (reduce-overhead) likewise."""
    from hf_deepseek.kernels import _linear_rows_triton

    layer, x = gpu_case(2048, 1536, 32)
    args = (x, layer.weight, layer.weight_scale_inv)
    with torch.no_grad():
        _linear_rows_triton.launch(*args)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = _linear_rows_triton.launch(*args)
        x.copy_(torch.randn_like(x))
        graph.replay()
        eager = _linear_rows_triton.launch(*args)
        again = torch.compile(linear_rows.linear_rows_fp8, mode="reduce-overhead", fullgraph=True)(*args).clone()
    assert torch.equal(replayed, eager)
    assert torch.equal(again, eager)
