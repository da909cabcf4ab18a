"""The routed experts' matrix-vector kernels for a few decode tokens (`kernels/moe_gemv.py`): the op's torch
computation against the per-expert reference on the CPU, the model's decode path through the op, and on a GPU the
Triton kernels against the same computation."""

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.kernels import moe_gemv, moe_gemv_config
from hf_deepseek.modeling import moe_decode
from hf_deepseek.modeling.moe import RoutedExperts


def experts_and_routing(device, dtype, tokens=3, top_k=6, num_experts=16, hidden=256, inter=160, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=num_experts)
    experts = RoutedExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, hidden**-0.5)
        experts.down_proj.normal_(0, inter**-0.5)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    indices = torch.stack([torch.randperm(num_experts, device=device)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, device=device).softmax(dim=-1)
    return experts, x, indices, weights


def per_expert_float64(experts, x, indices, weights) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for e, w in zip(indices[t].tolist(), weights[t].double(), strict=True):
            gate, up = (experts.gate_up_proj[e].double() @ x[t].double()).chunk(2)
            out[t] += w * (experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


def test_op_computes_the_chosen_experts_on_the_cpu():
    experts, x, indices, weights = experts_and_routing("cpu", torch.float32)
    with torch.no_grad():
        out = moe_gemv.routed_experts_gemv(x, indices, weights, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(out.double(), per_expert_float64(experts, x, indices, weights), rtol=1e-5, atol=1e-6)
    assert not moe_gemv.usable(experts, x, 18)  # the kernels serve bf16 on CUDA only


def test_per_pair_products_summed_in_the_callers_graph_equal_the_ops_sum():
    """`summed_over_top_k` takes the op's fp32 per-pair products [N, k, d] and sums them itself (where Inductor fuses
    the sum into the next kernel): the same result as the op's own sum, bf16 and FP8 weights."""
    experts, x, indices, weights = experts_and_routing("cpu", torch.float32)
    args = (weights, experts.gate_up_proj, experts.down_proj)
    fp8, x8, indices8, weights8 = fp8_experts_and_routing("cpu", torch.float32, 256)
    cases = [
        (moe_gemv.routed_experts_gemv, x, indices, args),
        (moe_gemv.routed_experts_gemv_fp8, x8, indices8, (weights8, *fp8_args(fp8))),
    ]
    with torch.no_grad():
        for op, xs, idx, rest in cases:
            pairs = op(xs, idx, *rest, per_pair=True)
            assert pairs.shape == (*idx.shape, xs.shape[1]) and pairs.dtype == torch.float32
            summed = moe_gemv.summed_over_top_k(op, xs, idx, *rest)
            torch.testing.assert_close(summed, op(xs, idx, *rest), rtol=0, atol=0)


def test_model_decode_through_the_op_equals_the_default_path(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_routed_experts=16, num_experts_per_tok=4)
    model = DeepSeekForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, 12))
    default = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    calls = []
    original = moe_gemv.routed_experts_gemv

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(moe_gemv, "usable", lambda experts, x, pairs: pairs <= moe_gemv.MAX_PAIRS)
    monkeypatch.setattr(moe_gemv, "FOLD_SHARED", False)  # the routed experts' op alone (the fold: test_moe_shared_fold)
    monkeypatch.setattr(moe_gemv, "routed_experts_gemv", counted)
    through_op = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(through_op, default)
    assert (1, 4) in calls  # the decode steps' single token went through the op


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5])
def test_triton_kernels_match_float64(tokens):
    if not moe_gemv.triton_available():
        pytest.skip("needs Triton and CUDA")
    experts, x, indices, weights = experts_and_routing("cuda", torch.bfloat16, tokens=tokens, num_experts=64,
                                                       hidden=2048, inter=1408)  # fmt: skip
    assert moe_gemv.usable(experts, x, tokens * 6) is False  # grad mode on: training never takes it
    with torch.no_grad():
        assert moe_gemv.usable(experts, x, tokens * 6)
        out = moe_gemv.routed_experts_gemv(x, indices, weights, experts.gate_up_proj, experts.down_proj)
        want = per_expert_float64(experts, x, indices, weights)
        compiled = torch.compile(moe_decode.gemv_experts, mode="reduce-overhead", fullgraph=True)
        again = compiled(experts, x, indices, weights).clone()
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < 1e-2, error
    torch.testing.assert_close(again, out)


# FP8 weights with 128x128 block scales (a model kept in FP8): weight-only matrix-vector kernels


def fp8_experts_and_routing(device, dtype, inter, **kwargs):
    """RoutedExperts quantised to FP8InferenceExperts (gate and up with their own scale grids)."""
    from hf_deepseek.modeling.fp8 import FP8InferenceExperts

    experts, x, indices, weights = experts_and_routing(device, torch.float32, inter=inter, **kwargs)
    config = tiny_config(hidden_size=x.shape[1], moe_intermediate_size=inter, n_routed_experts=experts.num_experts)
    return FP8InferenceExperts.from_experts(experts, config), x.to(dtype), indices, weights


def fp8_args(fp8):
    return fp8.gate_up_proj, fp8.gate_up_proj_scale_inv, fp8.down_proj, fp8.down_proj_scale_inv


@pytest.mark.parametrize("inter", [160, 256])  # partial scale blocks, and whole ones
def test_fp8_op_computes_the_chosen_experts_from_the_dequantised_weights(inter):
    fp8, x, indices, weights = fp8_experts_and_routing("cpu", torch.float32, inter)
    gate_up, down = fp8.dequantized_weights()
    dense = RoutedExperts(tiny_config(hidden_size=256, moe_intermediate_size=inter, n_routed_experts=16))
    dense.gate_up_proj.data, dense.down_proj.data = gate_up, down
    with torch.no_grad():
        out = moe_gemv.routed_experts_gemv_fp8(x, indices, weights, *fp8_args(fp8))
    torch.testing.assert_close(out.double(), per_expert_float64(dense, x, indices, weights), rtol=1e-5, atol=1e-6)
    assert not moe_gemv.usable_fp8(fp8, x, indices.numel())  # CUDA only


def test_fp8_experts_take_the_weight_only_op_when_it_serves(monkeypatch):
    """FP8InferenceExperts.forward goes through the op for decode batches (weight-only: bf16 activations), and
    agrees with its FP8-GEMM path (activations quantised per 1x128 tile) to FP8's activation error."""
    fp8, x, indices, weights = fp8_experts_and_routing("cpu", torch.float32, 256)
    with torch.no_grad():
        gemm_path = fp8(x, indices, weights)
        calls = []
        original = moe_gemv.routed_experts_gemv_fp8
        monkeypatch.setattr(moe_gemv, "usable_fp8", lambda experts, x, pairs: pairs <= moe_gemv.MAX_PAIRS)
        monkeypatch.setattr(moe_gemv, "routed_experts_gemv_fp8", lambda *a, **k: calls.append(1) or original(*a, **k))
        weight_only = fp8(x, indices, weights)
        assert calls == [1]
        fp8.fp8_recipe = type(fp8.fp8_recipe)(weight_only_decode=False)
        assert torch.equal(fp8(x, indices, weights), gemm_path) and calls == [1]
    error = ((weight_only - gemm_path).norm() / weight_only.norm()).item()
    assert 1e-4 < error < 0.05, error


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5])
def test_fp8_triton_kernels_match_the_dequantised_weights(tokens):
    if not moe_gemv.triton_available():
        pytest.skip("needs Triton and CUDA")
    fp8, x, indices, weights = fp8_experts_and_routing("cuda", torch.bfloat16, 1408, tokens=tokens, num_experts=64,
                                                       hidden=2048)  # fmt: skip
    with torch.no_grad():
        assert moe_gemv.usable_fp8(fp8, x, tokens * 6)
        out = moe_gemv.routed_experts_gemv_fp8(x, indices, weights, *fp8_args(fp8))
        want = moe_gemv.reference(x.cpu(), indices.cpu(), weights.cpu(), *(w.cpu() for w in fp8.dequantized_weights()),
                                  act_dtype=torch.bfloat16)  # fmt: skip
        compiled = torch.compile(moe_gemv.routed_experts_gemv_fp8, mode="reduce-overhead", fullgraph=True)
        again = compiled(x, indices, weights, *fp8_args(fp8)).clone()
    error = ((out.cpu().double() - want.double()).norm() / want.double().norm()).item()
    assert error < 1e-2, error
    torch.testing.assert_close(again, out)


def fp8_linear_layer(device, in_features=320, out_features=200, seed=1):
    """An FP8InferenceLinear with partial 128x128 blocks in both dimensions."""
    from hf_deepseek.modeling.fp8 import FP8InferenceLinear

    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=True, device=device)
    return FP8InferenceLinear.from_linear(linear)


def test_fp8_linear_op_is_the_product_with_the_dequantised_weight(monkeypatch):
    layer = fp8_linear_layer("cpu")
    x = torch.randn(3, 320)
    with torch.no_grad():
        out = moe_gemv.linear_gemv_fp8(x, layer.weight, layer.weight_scale_inv)
        want = x.double() @ layer.dequantized(torch.float64).weight.T
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        assert not moe_gemv.usable_linear_fp8(x, layer.weight)  # CUDA only
        gemm_path = layer(x)
        calls = []
        original = moe_gemv.linear_gemv_fp8
        monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, w: x2.shape[0] <= moe_gemv.MAX_LINEAR_ROWS)
        monkeypatch.setattr(moe_gemv, "linear_gemv_fp8", lambda *a, **k: calls.append(1) or original(*a, **k))
        weight_only = layer(x[None])  # [1, 3, 320]: leading dimensions kept, bias added
    assert calls == [1] and weight_only.shape == (1, 3, 200)
    torch.testing.assert_close(weight_only[0], out + layer.bias)
    error = ((weight_only[0] - gemm_path).norm() / gemm_path.norm()).item()
    assert 1e-4 < error < 0.05, error  # the GEMM path's activations are quantised per 1x128 tile


@pytest.mark.gpu
def test_fp8_linear_kernel_matches_the_dequantised_weight():
    if not moe_gemv.triton_available():
        pytest.skip("needs Triton and CUDA")
    layer = fp8_linear_layer("cuda", 2048, 1536)
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert moe_gemv.usable_linear_fp8(x, layer.weight)
        out = moe_gemv.linear_gemv_fp8(x, layer.weight, layer.weight_scale_inv)
        want = x.double() @ layer.dequantized(torch.float64).weight.T
    error = ((out.double() - want).norm() / want.norm()).item()
    assert out.dtype == torch.bfloat16 and error < 1e-2, error


def test_two_fp8_layers_of_one_input_take_one_pair_launch_with_each_layers_result(monkeypatch):
    """MLA's q_a and kv_a as FP8 layers: `decode_linear.fused_pair` sends a decode row through
    `linear_gemv_pair_fp8` (one launch on CUDA), each half what the layer's own weight-only launch gives."""
    from hf_deepseek.modeling.decode_linear import fp8_decode_rows, fused_pair

    first, second = fp8_linear_layer("cpu", 320, 200, seed=1), fp8_linear_layer("cpu", 320, 72, seed=2)
    first.bias = second.bias = None
    x = torch.randn(1, 1, 320).to(torch.bfloat16)
    with torch.no_grad():
        assert fused_pair(first, second, x) is None  # CUDA only
        monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, w: x2.shape[0] <= moe_gemv.MAX_LINEAR_ROWS)
        calls = []
        original = moe_gemv.linear_gemv_pair_fp8
        monkeypatch.setattr(moe_gemv, "linear_gemv_pair_fp8", lambda *a: calls.append(1) or original(*a))
        one, two = fused_pair(first, second, x)
        assert calls == [1] and one.shape == (1, 1, 200) and two.shape == (1, 1, 72)
        assert torch.equal(one, first(x)) and torch.equal(two, second(x))
        want = x.double() @ first.dequantized(torch.float64).weight.T
        assert ((one.double() - want).norm() / want.norm()).item() < 1e-2
        second.bias = torch.nn.Parameter(torch.zeros(72), False)
        assert fp8_decode_rows(x, first, second) is None  # a bias: each layer its own launch
        monkeypatch.setattr(moe_gemv, "FUSED_Q_KV_A", False)
        second.bias = None
        assert fused_pair(first, second, x) is None


@pytest.mark.gpu
def test_fp8_pair_kernel_gives_each_fp8_layers_own_kernel_result():
    if not moe_gemv.fp8_kernels_available():
        pytest.skip("needs FP8 conversions in Triton")
    first, second = fp8_linear_layer("cuda", 2048, 1536, seed=1), fp8_linear_layer("cuda", 2048, 576, seed=2)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        pair = moe_gemv.linear_gemv_pair_fp8(x, first.weight, first.weight_scale_inv, second.weight,
                                             second.weight_scale_inv)  # fmt: skip
        own = [moe_gemv.linear_gemv_fp8(x, m.weight, m.weight_scale_inv) for m in (first, second)]
    assert torch.equal(pair, torch.cat(own, dim=-1))  # the same kernel code and configuration: the same sums


def test_compiled_fp8_decode_through_the_weight_only_ops_is_the_dequantised_model(monkeypatch):
    """A model with FP8 weights decoding through the weight-only ops, compiled as one graph (the custom ops' fake
    kernels), gives the logits of the same model with its weights dequantised to float32, where its FP8 GEMMs
    (activations quantised per 1x128 tile) do not."""
    import copy

    from transformers import CompileConfig

    from hf_deepseek.modeling.fp8 import FP8InferenceExperts, FP8InferenceLinear, convert_to_fp8_inference

    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, moe_intermediate_size=128, intermediate_size=256, n_routed_experts=8,
                         num_experts_per_tok=2, q_lora_rank=128, kv_lora_rank=128)  # fmt: skip
    model = convert_to_fp8_inference(DeepSeekForCausalLM(config).eval())
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, FP8InferenceLinear):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, module.dequantized(torch.float32))
        elif isinstance(module, FP8InferenceExperts):
            module.dequantize_(torch.float32)
    ids = torch.randint(3, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    greedy = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)

    def logits(m, **kwargs):
        return torch.stack(m.generate(ids, **greedy, **kwargs).logits)

    want = logits(reference, cache_implementation="dynamic")
    fp8_gemms = logits(model, cache_implementation="static")
    monkeypatch.setattr(moe_gemv, "usable_fp8", lambda experts, x, pairs: not torch.is_grad_enabled())
    monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, weight: not torch.is_grad_enabled())
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles the decode step on accelerators only
    got = logits(model, cache_implementation="static", compile_config=compile_config)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    assert (fp8_gemms - want).abs().max() > 1e-2


# Launch configurations (KernelConfig): split-K and pipelined variants of the kernels


def test_kernel_config_parsing_and_split_chunks():
    assert moe_gemv_config.kernel_config(None) == moe_gemv_config.CONFIG
    assert moe_gemv_config.kernel_config(None, fp8=True) == moe_gemv_config.FP8_CONFIG
    assert moe_gemv_config.kernel_config((32, 256, 4)) == moe_gemv_config.KernelConfig(32, 256, 4, 1, None)
    assert moe_gemv_config.parse_config("16, 512, 8, 4, 3") == moe_gemv_config.KernelConfig(16, 512, 8, 4, 3)
    assert moe_gemv_config.parse_config("16,128,4,2") == moe_gemv_config.KernelConfig(16, 128, 4, 2, None)
    assert moe_gemv_config.parse_config("16,128,4,2,none").stages is None
    assert moe_gemv_config.parse_config("") is None and moe_gemv_config.parse_config(None) is None
    for bad in ("32,256", "24,256,4", "32,256,4,0", "32,256,4,1,0", "1,2,4,1,1,1"):
        with pytest.raises(ValueError):
            moe_gemv_config.parse_config(bad)
    for k, split, block in ((2048, 4, 256), (1408, 4, 256), (1408, 3, 128), (320, 2, 128), (100, 8, 64), (5, 1, 256)):
        chunk = moe_gemv_config.split_chunk(k, split, block)
        programs = -(-k // chunk)
        assert chunk % block == 0 and programs <= split and (programs - 1) * chunk < k <= programs * chunk
    assert moe_gemv_config.split_chunk(2048, 1, 256) >= 2048


def test_module_reads_every_configuration_variable_at_import(monkeypatch):
    """A fresh import of moe_gemv_config with every variable set (as the tunes export them) takes each: the variables
    are parsed before the module's defaults exist, which once raised NameError at import."""
    env = {
        "HF_DEEPSEEK_MOE_GEMV_CONFIG": "4,2048,4,1,none",
        "HF_DEEPSEEK_MOE_GEMV_DOWN_CONFIG": "64,128,8,1,3",
        "HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG": "8,1024,4",
        "HF_DEEPSEEK_MOE_GEMV_FP8_DOWN_CONFIG": "16,256,4,2",
        "HF_DEEPSEEK_LINEAR_GEMV_CONFIG": "2,2048,4",
        "HF_DEEPSEEK_LINEAR_GEMV_FP8_CONFIG": "4,1024,4,1,2",
        "HF_DEEPSEEK_HEAD_GEMV_FP8_CONFIG": "16,512,8",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("fresh_moe_gemv_config", moe_gemv_config.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    got = (fresh.CONFIG, fresh.DOWN_CONFIG, fresh.FP8_CONFIG, fresh.FP8_DOWN_CONFIG)
    assert got == ((4, 2048, 4, 1, None), (64, 128, 8, 1, 3), (8, 1024, 4, 1, None), (16, 256, 4, 2, None))
    assert (fresh.LINEAR_CONFIG, fresh.LINEAR_FP8_CONFIG) == ((2, 2048, 4, 1, None), (4, 1024, 4, 1, 2))
    assert fresh.kernel_config(None, fp8=True, linear=True, head=True) == (16, 512, 8, 1, None)


def test_config_from_the_environment():
    assert moe_gemv_config.config_from_env({}) == moe_gemv_config.TUNED_BF16
    assert moe_gemv_config.config_from_env({}, default=moe_gemv_config.KernelConfig()) == (32, 256, 4, 1, None)
    got = moe_gemv_config.config_from_env({"HF_DEEPSEEK_MOE_GEMV_CONFIG": "16,256,8,2,3"})
    assert got == moe_gemv_config.KernelConfig(16, 256, 8, 2, 3)
    # the first variable set wins (FP8's own, then the shared one); empty counts as unset
    names = ("HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG", "HF_DEEPSEEK_MOE_GEMV_CONFIG")
    both = {"HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG": "8,512,4", "HF_DEEPSEEK_MOE_GEMV_CONFIG": "16,256,8,2,3"}
    assert moe_gemv_config.config_from_env(both, names=names) == (8, 512, 4, 1, None)
    shared = {"HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG": " ", "HF_DEEPSEEK_MOE_GEMV_CONFIG": "16,256,8,2,3"}
    assert moe_gemv_config.config_from_env(shared, names=names) == (16, 256, 8, 2, 3)
    # the dense layers' defaults, apart from the experts'
    assert moe_gemv_config.kernel_config(None, linear=True) == moe_gemv_config.LINEAR_CONFIG
    assert moe_gemv_config.kernel_config(None, fp8=True, linear=True) == moe_gemv_config.LINEAR_FP8_CONFIG
    linear_names = ("HF_DEEPSEEK_LINEAR_GEMV_CONFIG", "HF_DEEPSEEK_LINEAR_GEMV_FP8_CONFIG")
    if not any(os.environ.get(name, "").strip() for name in linear_names):  # unset: the tuned ones
        tuned = (moe_gemv_config.TUNED_LINEAR_BF16, moe_gemv_config.TUNED_LINEAR_FP8)
        assert tuned == (moe_gemv_config.LINEAR_CONFIG, moe_gemv_config.LINEAR_FP8_CONFIG)
    # the experts' down kernel: its own configuration, the experts' unless HF_DEEPSEEK_MOE_GEMV_(FP8_)DOWN_CONFIG set it
    assert moe_gemv_config.kernel_config(None, down=True) == moe_gemv_config.DOWN_CONFIG
    assert moe_gemv_config.kernel_config(None, fp8=True, down=True) == moe_gemv_config.FP8_DOWN_CONFIG
    assert moe_gemv_config.kernel_config(None, linear=True, down=True) == moe_gemv_config.LINEAR_CONFIG
    down_names = ("HF_DEEPSEEK_MOE_GEMV_DOWN_CONFIG", "HF_DEEPSEEK_MOE_GEMV_FP8_DOWN_CONFIG")
    expert_names = ("HF_DEEPSEEK_MOE_GEMV_CONFIG", "HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG")
    if not any(os.environ.get(name, "").strip() for name in down_names + expert_names):
        assert (moe_gemv_config.DOWN_CONFIG, moe_gemv_config.FP8_DOWN_CONFIG) == (
            moe_gemv_config.CONFIG,
            moe_gemv_config.TUNED_FP8_DOWN,
        )
        assert moe_gemv_config.FP8_CONFIG == moe_gemv_config.TUNED_FP8 != moe_gemv_config.TUNED_FP8_DOWN
    fp8_down = {"HF_DEEPSEEK_MOE_GEMV_FP8_DOWN_CONFIG": "16,512,4,2,2", "HF_DEEPSEEK_MOE_GEMV_DOWN_CONFIG": "8,64,2"}
    names = ("HF_DEEPSEEK_MOE_GEMV_FP8_DOWN_CONFIG", "HF_DEEPSEEK_MOE_GEMV_DOWN_CONFIG")
    assert moe_gemv_config.config_from_env(fp8_down, names=names) == (16, 512, 4, 2, 2)
    # the experts' FP8 configuration alone set: the down kernel follows it
    names += ("HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG", "HF_DEEPSEEK_MOE_GEMV_CONFIG")
    only_experts = {"HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG": "16,256,4"}
    assert moe_gemv_config.config_from_env(only_experts, names=names) == (16, 256, 4, 1, None)
    # an FP8 LM head's own configuration (its tuned one unless HF_DEEPSEEK_HEAD_GEMV_FP8_CONFIG sets it)
    assert moe_gemv_config.kernel_config(None, fp8=True, linear=True, head=True) == moe_gemv_config.HEAD_FP8_CONFIG
    assert moe_gemv_config.kernel_config(None, linear=True, head=True) == moe_gemv_config.LINEAR_CONFIG  # bf16
    assert moe_gemv_config.kernel_config((64, 256, 8), fp8=True, linear=True, head=True) == (64, 256, 8, 1, None)
    if not os.environ.get("HF_DEEPSEEK_HEAD_GEMV_FP8_CONFIG", "").strip():
        assert moe_gemv_config.HEAD_FP8_CONFIG == moe_gemv_config.TUNED_HEAD_FP8


VARIANTS = [
    (32, 256, 4, 1, 3),
    (16, 256, 4, 2, None),
    (32, 128, 4, 4, 3),
    (16, 512, 8, 4, 2),
    (8, 64, 2, 3, None),
    (8, 256, 4, 1, 3),
    (16, 512, 4, 1, 2),
    (4, 2048, 4, 1, None),
    (8, 1024, 4, 1, None),
    (2, 2048, 4, 1, None),
]  # the last five: the dense layers' earlier bf16 default, FP8's earlier and current one, an FP8 LM head's, bf16's


def bench_shape_kernel_case(tokens: int):
    """The Triton launcher, its arguments at the bench's expert shapes (bf16, `tokens` tokens at top-6 of 64) and
    the float64 per-expert reference of their output; skips without Triton and CUDA."""
    if not moe_gemv.triton_available():
        pytest.skip("needs Triton and CUDA")
    from hf_deepseek.kernels import _moe_gemv_triton

    experts, x, indices, weights = experts_and_routing("cuda", torch.bfloat16, tokens=tokens, num_experts=64,
                                                       hidden=2048, inter=1408)  # fmt: skip
    with torch.no_grad():
        want = per_expert_float64(experts, x, indices, weights)
    return _moe_gemv_triton, (x, indices, weights, experts.gate_up_proj, experts.down_proj), want


@pytest.mark.gpu
def test_kernels_launched_with_pdl_give_the_same_results_in_a_cuda_graph(monkeypatch):
    """Programmatic dependent launch (moe_gemv_config.PDL): each kernel may start while the one before it runs and
    prefetches its weights, so it must still wait for that kernel's output: a chain of dependent launches (FP8 and
    bf16 linear layers, q_a / kv_a's pair, the routed experts, the Triton attention's split and combine), captured
    in a CUDA graph as the decode step is and replayed, equals the same chain launched without PDL."""
    _moe_gemv_triton, args, _ = bench_shape_kernel_case(1)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs SM90 or later")
    from hf_deepseek.kernels import _mla_decode_triton

    layer = fp8_linear_layer("cuda", 2048, 1536)
    dense = torch.randn(2048, 1536, device="cuda", dtype=torch.bfloat16) / 40
    first, second = (torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16) / 45 for n in (1536, 576))
    cache = torch.randn(1, 256, 576, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([200], device="cuda", dtype=torch.int32)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        h = _moe_gemv_triton.launch_linear_fp8(x, layer.weight, layer.weight_scale_inv)  # [1, 1536]
        h = _moe_gemv_triton.launch_linear(h, dense)  # [1, 2048], reads the kernel before's output
        pair = _moe_gemv_triton.launch_linear_pair(h, first, second)  # [1, 2112]
        experts = _moe_gemv_triton.launch(pair[:, :2048].contiguous(), *args[1:])  # [1, 2048]
        query = experts.view(1, 4, 512).repeat(1, 4, 1)  # 16 heads of a 512-wide latent query
        query = torch.cat([query, pair[:, -64:].view(1, 1, 64).expand(1, 16, 64)], dim=-1)
        return _mla_decode_triton.launch(query, cache, lengths, 0.1)

    with torch.no_grad():
        plain = chain()
        monkeypatch.setattr(moe_gemv_config, "PDL", True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = chain()
        for _ in range(3):
            graph.replay()
        eager = chain()
    torch.cuda.synchronize()
    assert torch.equal(eager, plain) and torch.equal(replayed, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("config", VARIANTS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_triton_kernel_variants_match_float64(tokens, config):
    _moe_gemv_triton, args, want = bench_shape_kernel_case(tokens)
    with torch.no_grad():
        out = _moe_gemv_triton.launch(*args, config)
        default = _moe_gemv_triton.launch(*args)
        graph = torch.cuda.CUDAGraph()  # as the compiled decode step replays it (the zeroed buffers included)
        with torch.cuda.graph(graph):
            replayed = _moe_gemv_triton.launch(*args, config)
        graph.replay()
        graph.replay()
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < 1e-2, error
    torch.testing.assert_close(out, default, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(replayed, out, rtol=2e-2, atol=2e-3)


def test_per_pair_output_slots_count_split_k_chunks_on_cuda_only(monkeypatch):
    """Under a split-K configuration of the down kernel the kernels' per-pair output holds each pair's partial sums
    over its chunks of I (no atomics: the caller sums them in a fixed order); the ops' fakes give that shape. The
    gate/up kernel's split (over d) does not change it."""
    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.setattr(moe_gemv_config, "DOWN_CONFIG", moe_gemv_config.KernelConfig(32, 256, 4, 2, None))
    assert moe_gemv.output_slots(cuda, 8, 1408, fp8=False) == 8 * 2  # 1408 in chunks of 768: two
    assert moe_gemv.output_slots(cpu, 8, 1408, fp8=False) == 8  # the torch path: one slot a pair
    monkeypatch.setattr(moe_gemv_config, "FP8_DOWN_CONFIG", moe_gemv_config.KernelConfig(16, 256, 8, 4, None))
    assert moe_gemv.output_slots(cuda, 6, 1408, fp8=True) == 6 * 3  # chunks of 512: three
    monkeypatch.setattr(moe_gemv_config, "FP8_DOWN_CONFIG", moe_gemv_config.KernelConfig(32, 256, 4, 1, None))
    monkeypatch.setattr(moe_gemv_config, "FP8_CONFIG", moe_gemv_config.KernelConfig(16, 256, 8, 4, None))
    assert moe_gemv.output_slots(cuda, 6, 1408, fp8=True) == 6


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(32, 256, 4, 2, None), (16, 256, 8, 4, None)])
def test_split_k_launches_repeat_bit_for_bit_and_give_each_pairs_partial_sums(config):
    _moe_gemv_triton, args, want = bench_shape_kernel_case(1)
    with torch.no_grad():
        runs = [_moe_gemv_triton.launch(*args, config) for _ in range(5)]
        pairs = _moe_gemv_triton.launch(*args, config, per_pair=True)
    assert all(torch.equal(run, runs[0]) for run in runs)
    chunks = -(-1408 // moe_gemv_config.split_chunk(1408, config[3], config[1]))
    assert pairs.shape == (1, 6 * chunks, 2048)
    assert torch.equal(pairs.sum(dim=1).to(torch.bfloat16), runs[0])
    assert ((runs[0].double() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, (32, 256, 4, 1, 3), (8, 64, 2, 1, 3)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_down_kernel_summing_the_top_k_itself_matches_float64(tokens, config):
    """sum_top_k: one program a token sums its top-k products and stores bf16 (no torch sum and conversion after):
    the float64 reference's result, and the per-pair path's to bf16 rounding."""
    _moe_gemv_triton, args, want = bench_shape_kernel_case(tokens)
    with torch.no_grad():
        summed = _moe_gemv_triton.launch(*args, config, sum_top_k=True)
        per_pair = _moe_gemv_triton.launch(*args, config, sum_top_k=False)
    x = args[0]
    assert summed.dtype == x.dtype and summed.shape == x.shape
    assert ((summed.double() - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(summed, per_pair, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("config", VARIANTS)
def test_fp8_triton_kernel_variants_match_the_dequantised_weights(config):
    if not moe_gemv.triton_available() or not moe_gemv.fp8_kernels_available():
        pytest.skip("needs Triton and a CUDA GPU with FP8")
    from hf_deepseek.kernels import _moe_gemv_triton

    fp8, x, indices, weights = fp8_experts_and_routing("cuda", torch.bfloat16, 1408, tokens=3, num_experts=64,
                                                       hidden=2048)  # fmt: skip
    gate_up, gate_up_scale, down, down_scale = fp8_args(fp8)
    with torch.no_grad():
        out = _moe_gemv_triton.launch(x, indices, weights, gate_up, down, config, gate_up_scale, down_scale)
        want = moe_gemv.reference(x.cpu(), indices.cpu(), weights.cpu(), *(w.cpu() for w in fp8.dequantized_weights()),
                                  act_dtype=torch.bfloat16)  # fmt: skip
        layer = fp8_linear_layer("cuda", 2048, 1536)
        rows = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
        linear = _moe_gemv_triton.launch_linear_fp8(rows, layer.weight, layer.weight_scale_inv, config)
        want_linear = rows.double() @ layer.dequantized(torch.float64).weight.T
    error = ((out.cpu().double() - want.double()).norm() / want.double().norm()).item()
    assert error < 1e-2, error
    error = ((linear.double() - want_linear).norm() / want_linear.norm()).item()
    assert error < 1e-2, error


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(32, 256, 4, 1, None), (16, 256, 4, 1, 3), (16, 512, 4, 1, 2)])
def test_fp8_linear_stores_bf16_rounded_to_nearest_even_on_gpu(config):
    """Without split-K the FP8 linear kernel writes bf16 itself: its fp32 sums (what it stores for fp32 rows)
    rounded to nearest even, bit for bit what `.to(torch.bfloat16)` after an fp32 output gave."""
    if not moe_gemv.triton_available() or not moe_gemv.fp8_kernels_available():
        pytest.skip("needs Triton and a CUDA GPU with FP8")
    from hf_deepseek.kernels import _moe_gemv_triton

    layer = fp8_linear_layer("cuda", 2048, 576)
    rows = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = _moe_gemv_triton.launch_linear_fp8(rows, layer.weight, layer.weight_scale_inv, config)
        sums = _moe_gemv_triton.launch_linear_fp8(rows.float(), layer.weight, layer.weight_scale_inv, config)
    assert got.dtype == torch.bfloat16 and sums.dtype == torch.float32
    assert torch.equal(got, sums.to(torch.bfloat16))


def test_pdl_launch_arguments_only_where_asked_for_and_on_hopper(monkeypatch):
    """`moe_gemv_config.pdl_arguments`: nothing unless PDL is on and the device is CUDA of capability 9+ (the kernels
    then compile as without it); with it, the launch flag, the kernels' constexpr and the weight lines to prefetch:
    128-byte lines, a power of two of them within K, at most 64."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(moe_gemv_config, "PDL", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert moe_gemv_config.pdl_arguments(cuda, 2048) == {}
    monkeypatch.setattr(moe_gemv_config, "PDL", True)
    assert moe_gemv_config.pdl_arguments(cpu, 2048) == {}
    assert moe_gemv_config.pdl_arguments(cuda) == dict(PDL=True, launch_pdl=True)  # nothing to prefetch
    assert moe_gemv_config.pdl_arguments(cuda, 2048) == dict(PDL=True, launch_pdl=True, LINES=32, LINE=64)  # bf16
    assert moe_gemv_config.prefetch_lines(1536, 1) == (8, 128)  # FP8: 12 lines of 128 elements, the power of 2 below
    assert moe_gemv_config.prefetch_lines(10944, 2) == (64, 64)  # capped
    assert moe_gemv_config.prefetch_lines(40, 2) == (1, 64)  # K under a line: one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert moe_gemv_config.pdl_arguments(cuda, 2048) == {}  # before Hopper


def test_the_q_a_norm_and_an_fp8_q_b_take_one_norm_linear_launch(monkeypatch):
    """With HF_DEEPSEEK_FUSED_NORM_LINEAR on (the default), `decode_linear.fused_norm_linear` sends a decode row of an
    RMSNorm followed by an FP8 layer through `norm_linear_gemv_fp8`: on the CPU the norm's output times the dequantised
    weight, rounded once, which is what the FP8 layer's own weight-only launch gives for the norm's output."""
    from hf_deepseek.modeling.decode_linear import fused_norm_linear
    from hf_deepseek.modeling.layers import RMSNorm

    layer = fp8_linear_layer("cpu", 320, 200)
    layer.bias = None
    norm = RMSNorm(320, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = (torch.rand(320) + 0.5).to(torch.bfloat16)
    x = torch.randn(1, 1, 320).to(torch.bfloat16)
    monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, w: x2.shape[0] <= moe_gemv.MAX_LINEAR_ROWS)
    with torch.no_grad():
        monkeypatch.setattr(moe_gemv, "FUSED_NORM_LINEAR", False)  # HF_DEEPSEEK_FUSED_NORM_LINEAR=0
        assert fused_norm_linear(norm, layer, x) is None
        monkeypatch.setattr(moe_gemv, "FUSED_NORM_LINEAR", True)
        calls = []
        original = moe_gemv.norm_linear_gemv_fp8
        monkeypatch.setattr(moe_gemv, "norm_linear_gemv_fp8", lambda *a: calls.append(1) or original(*a))
        fused = fused_norm_linear(norm, layer, x)
        assert calls == [1] and fused.shape == (1, 1, 200)
        assert torch.equal(fused, layer(norm(x)))
        want = norm(x).double() @ layer.dequantized(torch.float64).weight.T
        assert ((fused.double() - want).norm() / want.norm()).item() < 1e-2


def test_an_fp8_swiglu_mlp_takes_one_gate_up_launch(monkeypatch):
    """A SwiGLU MLP of FP8 layers: its decode rows (up to MAX_LINEAR_ROWS) take `gate_up_gemv_fp8` once, whose
    CPU path is SiLU(gate) * up from fp32 products of the dequantised weights rounded once, within bf16 rounding of
    float64 and of the unfused path (gate and up rounded apart); more rows, or HF_DEEPSEEK_FUSED_GATE_UP=0, keep the
    three projections."""
    from hf_deepseek.modeling.decode_linear import fused_gate_up
    from hf_deepseek.modeling.layers import SwiGLUMLP

    mlp = SwiGLUMLP(320, 200)
    mlp.gate_proj, mlp.up_proj = fp8_linear_layer("cpu", 320, 200), fp8_linear_layer("cpu", 320, 200, seed=2)
    mlp.down_proj = fp8_linear_layer("cpu", 200, 320, seed=3)
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        layer.bias = None
    monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, w: x2.shape[0] <= moe_gemv.MAX_LINEAR_ROWS)
    calls, original = [], moe_gemv.gate_up_gemv_fp8
    monkeypatch.setattr(moe_gemv, "gate_up_gemv_fp8", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    torch.manual_seed(0)
    x = torch.randn(1, 2, 320).to(torch.bfloat16)
    gate, up = (m.dequantized(torch.float64).weight for m in (mlp.gate_proj, mlp.up_proj))
    want = torch.nn.functional.silu(x.double() @ gate.T) * (x.double() @ up.T)
    with torch.no_grad():
        act = fused_gate_up(mlp, x)
        assert calls == [2] and act.shape == (1, 2, 200) and act.dtype == torch.bfloat16
        assert ((act.double() - want).norm() / want.norm()).item() < 4e-3
        fused = mlp(x)
        monkeypatch.setattr(moe_gemv, "FUSED_GATE_UP", False)
        unfused = mlp(x)
        assert calls == [2, 2]  # switched off: the three projections
        torch.testing.assert_close(fused, unfused, rtol=2e-2, atol=2e-2)
        monkeypatch.setattr(moe_gemv, "FUSED_GATE_UP", True)
        assert fused_gate_up(mlp, torch.randn(1, 5, 320).to(torch.bfloat16)) is None  # 5 rows: past the kernel's
        assert calls == [2, 2]


def test_the_input_norm_and_fp8_q_a_kv_a_take_one_launch(monkeypatch):
    """With HF_DEEPSEEK_FUSED_INPUT_NORM on (the default), `decode_linear.fused_norm_pair` sends a decode row of an
    RMSNorm followed by two FP8 layers of its output through `norm_linear_gemv_pair_fp8`: on the CPU each half is what
    the FP8 layer's own weight-only launch gives for the norm's output; off, None."""
    from hf_deepseek.modeling.decode_linear import fused_norm_pair
    from hf_deepseek.modeling.layers import RMSNorm

    first, second = fp8_linear_layer("cpu", 320, 200), fp8_linear_layer("cpu", 320, 72, seed=2)
    first.bias = second.bias = None
    norm = RMSNorm(320, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = (torch.rand(320) + 0.5).to(torch.bfloat16)
    x = torch.randn(1, 1, 320).to(torch.bfloat16)
    monkeypatch.setattr(moe_gemv, "usable_linear_fp8", lambda x2, w: x2.shape[0] <= moe_gemv.MAX_LINEAR_ROWS)
    with torch.no_grad():
        monkeypatch.setattr(moe_gemv, "FUSED_INPUT_NORM", False)
        assert fused_norm_pair(norm, first, second, x) is None
        monkeypatch.setattr(moe_gemv, "FUSED_INPUT_NORM", True)
        calls = []
        original = moe_gemv.norm_linear_gemv_pair_fp8
        monkeypatch.setattr(moe_gemv, "norm_linear_gemv_pair_fp8", lambda *a: calls.append(1) or original(*a))
        one, two = fused_norm_pair(norm, first, second, x)
        assert calls == [1] and one.shape == (1, 1, 200) and two.shape == (1, 1, 72)
        assert torch.equal(one, first(norm(x))) and torch.equal(two, second(norm(x)))
        monkeypatch.setattr(moe_gemv, "FUSED_Q_KV_A", False)  # the pair's own switch off: no pair launch either
        assert fused_norm_pair(norm, first, second, x) is None


@pytest.mark.gpu
def test_fp8_norm_linear_kernel_matches_the_norm_then_the_fp8_layer():
    """At the bench's q_b shape: the FP8 norm-prologue kernel against RMSNorm then the dequantised weight in float64,
    and within a rounding of the norm's output through the FP8 layer's own launch."""
    if not moe_gemv.fp8_kernels_available():
        pytest.skip("needs FP8 conversions in Triton")
    layer = fp8_linear_layer("cuda", 1536, 3072)
    joined = torch.randn(1, 1536 + 576, device="cuda", dtype=torch.bfloat16)
    x = joined[:, :1536]  # the q_a / kv_a pair's output: row stride 2112
    g = (torch.rand(1536, device="cuda") + 0.5).to(torch.bfloat16)
    with torch.no_grad():
        got = moe_gemv.norm_linear_gemv_fp8(x, g, 1e-6, layer.weight, layer.weight_scale_inv)
        normed = moe_gemv.rms_norm(x, g, 1e-6)
        want = normed.double() @ layer.dequantized(torch.float64).weight.T
        own = moe_gemv.linear_gemv_fp8(normed, layer.weight, layer.weight_scale_inv)
    assert got.dtype == torch.bfloat16 and ((got.double() - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(got, own, rtol=2**-7, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp8-shared"])
def test_fused_experts_launch_equals_the_two_launches_in_a_cuda_graph(kind):
    """`launch(..., fused=True)`: the gate/up and down kernels' work in one launch of persistent programs, each down
    block waiting on its pair's counter. At the bench's shapes (batch 1, top-6 of 64; FP8 with two shared slices
    folded in and the down kernel in two chunks of I), eagerly and captured in a CUDA graph replayed several times
    (the counters set back to zero by each launch), it equals the two launches; float64 bounds the bf16 case."""
    _moe_gemv_triton, args, want = bench_shape_kernel_case(1)
    from hf_deepseek.kernels.counters import counters
    from hf_deepseek.modeling.fp8_numerics import quantize_blocks

    options = {}
    if kind == "fp8-shared":
        fp8, x, indices, weights = fp8_experts_and_routing("cuda", torch.bfloat16, 1408, tokens=1, num_experts=64,
                                                           hidden=2048)  # fmt: skip
        torch.manual_seed(3)
        shapes = ((2 * 1408, 2048), (2 * 1408, 2048), (2048, 2 * 1408))
        shared = [quantize_blocks(torch.randn(*s, device="cuda") / s[1] ** 0.5) for s in shapes]
        gate_up, gate_up_scale, down, down_scale = fp8_args(fp8)
        args = (x, indices, weights, gate_up, down)
        options = dict(gate_up_scale=gate_up_scale, down_scale=down_scale, shared=tuple(q for q, _ in shared),
                       shared_scales=tuple(s for _, s in shared))  # fmt: skip
    with torch.no_grad():
        apart = _moe_gemv_triton.launch(*args, per_pair=True, **options)
        fused = _moe_gemv_triton.launch(*args, per_pair=True, fused=True, **options)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            first = _moe_gemv_triton.launch(*args, per_pair=True, fused=True, **options)
            second = _moe_gemv_triton.launch(*args, per_pair=True, fused=True, **options)  # the counters reused
        for _ in range(3):
            graph.replay()
    torch.cuda.synchronize()
    assert not counters("moe_experts", 2 * _moe_gemv_triton.FUSED_MAX_PAIRS, args[0].device).any()
    torch.testing.assert_close(fused, apart, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(first, apart, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(second, apart, rtol=1e-6, atol=1e-7)
    if kind == "bf16":
        error = ((fused.sum(dim=1).double() - want).norm() / want.norm()).item()
        assert error < 1e-2, error
