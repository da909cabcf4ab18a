"""The compiled batch-1 decode step's launches, counted on the CPU (`benchmarks/decode_kernel_census.py`: the GPU
path's ops forced on, Inductor deciding the fusions between them): the experts' top-k sum fuses into the norm after
the MoE layer, and the opt-in kernels together launch fewer kernels a step than the default path."""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "decode_kernel_census", Path(__file__).resolve().parents[1] / "benchmarks" / "decode_kernel_census.py"
)
census_script = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = census_script  # Dynamo looks up the module of the functions it traces
spec.loader.exec_module(census_script)


@functools.cache
def census_of(variant: str, baseline: bool = True) -> dict:
    """`census_script.census` of a variant, once per test session (each compiles a decode step afresh)."""
    return census_script.census(census_script.VARIANTS[variant], baseline=baseline)


def launches(result: dict) -> int:
    return len(result["kernels"]) + sum(result["ops"].values())


@pytest.fixture(scope="module")
def default_and_all():
    return census_of("launches-apart"), census_of("all")


def test_the_experts_top_k_sum_fuses_into_the_next_norm(default_and_all):
    """Each MoE layer's per-pair products are summed in a kernel that also computes the next RMSNorm: no kernel of
    its own for the sum (the two MoE layers of the census model, in both variants; the shared MLPs folded into the
    routed experts' launches in both)."""
    for result in default_and_all:
        with_sum = [name for name in result["kernels"] if "sum" in name]
        assert len(with_sum) == 2 and all("rsqrt" in name for name in with_sum), result["kernels"]
        assert result["ops"]["torch.ops.hf_deepseek.routed_and_shared_experts_gemv"] == 2


def test_every_opt_in_kernel_together_launches_fewer_kernels(default_and_all):
    """Per layer: W_UK and W_UV as library matmuls, the query's concatenation, the MLPs' separate gate and up and
    activation, the q_a norm apart in the default (q_a and kv_a in one launch in both); the fused ops instead with
    every switch on (the shared MLPs in the routed experts' launches, so only the dense layer's MLP takes the
    gate/up launch)."""
    default, every = default_and_all
    assert default["ops"]["torch.ops.aten.bmm"] == 6  # W_UK and W_UV of three layers, as cuBLAS calls on a GPU
    assert "torch.ops.aten.bmm" not in every["ops"] and every["ops"]["torch.ops.hf_deepseek.head_matmul"] == 6
    assert (
        default["ops"]["torch.ops.hf_deepseek.linear_gemv_pair"]
        == every["ops"]["torch.ops.hf_deepseek.linear_gemv_pair"]
        == 3
    )
    assert every["ops"]["torch.ops.hf_deepseek.gate_up_gemv"] == 1
    assert every["ops"]["torch.ops.hf_deepseek.norm_linear_gemv"] == 3
    assert launches(every) <= launches(default) - 3, (launches(every), launches(default))  # one a layer at least


def test_q_a_and_kv_a_in_one_launch_save_a_launch_a_layer(default_and_all):
    """The default's pair op against the two projections' matrix-vector launches (`ours-fast-separate-q-kv-a`); on
    the CPU Inductor also fuses one kernel fewer a layer around it (43 against 49 launches), hence "at least"."""
    default, separate = default_and_all[0], census_of("separate-q-kv-a")
    assert "torch.ops.hf_deepseek.linear_gemv_pair" not in separate["ops"]
    gemv = "torch.ops.hf_deepseek.linear_gemv"
    assert separate["ops"][gemv] == default["ops"][gemv] + 2 * 3
    assert launches(default) <= launches(separate) - 3, (launches(default), launches(separate))


def test_the_shared_mlp_folded_into_the_routed_launches_saves_four_launches_a_moe_layer():
    """Its gate, up and down matrix-vector launches and the activation's Inductor kernel, in both MoE layers."""
    apart, folded = (census_of(v) for v in ("unfolded", "launches-apart"))
    assert folded["ops"]["torch.ops.hf_deepseek.routed_and_shared_experts_gemv"] == 2
    assert "torch.ops.hf_deepseek.routed_experts_gemv" not in folded["ops"]
    assert folded["ops"]["torch.ops.hf_deepseek.linear_gemv"] == apart["ops"]["torch.ops.hf_deepseek.linear_gemv"] - 6
    assert launches(folded) == launches(apart) - 4 * 2, (launches(folded), launches(apart))


def test_every_opt_in_kernel_together_gives_the_default_paths_logits():
    """The census model's prefill and three decode steps (eager; the ops' torch paths) with every switch on give the
    default path's logits: each fused op is wired to the tensors the unfused modules read."""
    import torch

    from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
    from hf_deepseek.modeling.decode_linear import use_decode_linears
    from hf_deepseek.modeling.latent_cache import LatentStaticCache

    torch.manual_seed(0)
    # weights large enough that attention moves the logits: the roped part of the query reversed by the fused
    # W_UK launch changes them by 14% (relative norm), bf16's rounding differences by 0.5%
    config = DeepSeekConfig(**census_script.CONFIG, initializer_range=0.05)
    model = DeepSeekForCausalLM(config).to(torch.bfloat16).eval()
    ids, steps = torch.randint(3, config.vocab_size, (1, 20)), torch.randint(3, config.vocab_size, (1, 3))
    logits = {}
    for variant in ("launches-apart", "all"):
        with census_script.gpu_choices(census_script.VARIANTS[variant]), torch.no_grad():
            use_decode_linears(model)
            cache = LatentStaticCache(config, max_cache_len=32)
            cache.unpadded = True
            model(ids, cache=cache, use_cache=True)
            logits[variant] = torch.cat([model(steps[:, i : i + 1], cache=cache).logits for i in range(3)], dim=1)
    fused, default = logits["all"].double(), logits["launches-apart"].double()
    assert ((fused - default).norm() / default.norm()).item() < 0.02


def test_the_fewest_launches_row_saves_three_launches_a_layer(default_and_all):
    """`ours-fast-fewest-launches`: the MLA front (kv norm, RoPE, the latent-cache write and W_UK in one launch)
    with W_UV in the attention's combine launch leaves no batched matmul and no RoPE or cache-write kernel of
    Inductor's in a layer; with the q_a norm in q_b's launch, at least three launches fewer a layer than the
    default (30 against 43 on the CPU, torch 2.13)."""
    default, fewest = default_and_all[0], census_of("fewest-launches")
    assert fewest["ops"]["torch.ops.hf_deepseek.mla_decode_front"] == 3
    assert "torch.ops.aten.bmm" not in fewest["ops"] and "torch.ops.hf_deepseek.head_matmul" not in fewest["ops"]
    assert not [name for name in fewest["kernels"] if "index_copy" in name or "cat" in name], fewest["kernels"]
    assert launches(fewest) <= launches(default) - 3 * 3, (launches(fewest), launches(default))


def test_the_residual_sum_and_norm_in_the_routers_launch_save_a_kernel_a_moe_layer():
    """`ours-fast-fewest-launches-router-norm`: each MoE layer's post-attention residual sum and RMSNorm go into
    the router's launch (`add_norm_route_tokens`), one Inductor kernel fewer in each of the two MoE layers."""
    fewest, fused = (census_of(v) for v in ("fewest-launches", "fewest-launches-router-norm"))
    assert fused["ops"]["torch.ops.hf_deepseek.add_norm_route_tokens"] == 2
    assert "torch.ops.hf_deepseek.route_tokens" not in fused["ops"]
    assert len(fused["kernels"]) == len(fewest["kernels"]) - 2, (fused["kernels"], fewest["kernels"])
    assert launches(fused) == launches(fewest) - 2


def test_the_default_step_is_the_fewest_launches_one(default_and_all):
    """The launch-saving kernels are on by default: the default step's census is the fewest-launches one with the
    router's add+norm, 11 launches fewer than with every one of them off (28 against 43 on the CPU, torch 2.13)."""
    apart, default = default_and_all[0], census_of("default", baseline=False)
    fewest = census_of("default")
    assert default == fewest
    assert launches(default) <= launches(apart) - 3 * 3 - 2, (launches(default), launches(apart))


def test_the_mla_chain_takes_three_launches_a_layer_into_one():
    """`ours-fast-mla-chain`: each layer's q_a / kv_a pair, q_b with its norm and MLA front become one chain op, two
    launches fewer a layer than the default step at least (three layers: 21 against 28 on the CPU, torch 2.13, where
    Inductor also folds the first layer's cos / sin slices into its kernel before the op)."""
    default, chained = (census_of(v, baseline=False) for v in ("default", "mla-chain"))
    assert chained["ops"]["torch.ops.hf_deepseek.mla_decode_chain"] == 3
    for joined in ("linear_gemv_pair", "norm_linear_gemv", "mla_decode_front"):
        assert f"torch.ops.hf_deepseek.{joined}" not in chained["ops"], chained["ops"]
    assert launches(chained) <= launches(default) - 2 * 3, (launches(chained), launches(default))


def test_the_input_norm_in_the_q_a_kv_a_launch_leaves_the_residual_sum_alone():
    """The default step (HF_DEEPSEEK_FUSED_INPUT_NORM on) against the input norm apart: the pair op with the norm in
    every layer, and no Inductor kernel computes a norm before it (the residual sum after a MoE layer is left to join
    the experts' top-k sum, a launch fewer on a GPU, where that sum and the norm took two kernels; on the CPU they
    were already one)."""
    default, fused = census_of("separate-input-norm", baseline=False), census_of("launches-apart", baseline=False)
    layers = census_script.CONFIG["num_hidden_layers"]
    assert fused["ops"]["torch.ops.hf_deepseek.norm_linear_gemv_pair"] == layers
    assert "torch.ops.hf_deepseek.linear_gemv_pair" not in fused["ops"]
    before_pair = [k for k in fused["kernels"] if "norm_linear_gemv_pair" in k]
    assert len(before_pair) == layers and not any("rsqrt" in k for k in before_pair), fused["kernels"]
    assert launches(fused) <= launches(default), (launches(fused), launches(default))
