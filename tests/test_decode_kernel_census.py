"""The compiled batch-1 decode step's launches, counted on the CPU (`benchmarks/decode_kernel_census.py`: the GPU
path's ops forced on, Inductor deciding the fusions between them): the experts' top-k sum fuses into the norm after
the MoE layer, and the opt-in kernels together launch fewer kernels a step than the default path."""

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


def launches(result: dict) -> int:
    return len(result["kernels"]) + sum(result["ops"].values())


@pytest.fixture(scope="module")
def default_and_all():
    return census_script.census([]), census_script.census(census_script.VARIANTS["all"])


def test_the_experts_top_k_sum_fuses_into_the_next_norm(default_and_all):
    """Each MoE layer's per-pair products are summed in a kernel that also computes the next RMSNorm: no kernel of
    its own for the sum (the two MoE layers of the census model, in both variants)."""
    for result in default_and_all:
        with_sum = [name for name in result["kernels"] if "sum" in name]
        assert len(with_sum) == 2 and all("rsqrt" in name for name in with_sum), result["kernels"]
        assert result["ops"]["torch.ops.hf_deepseek.routed_experts_gemv"] == 2


def test_every_opt_in_kernel_together_launches_fewer_kernels(default_and_all):
    """Per layer: W_UK and W_UV as library matmuls, the query's concatenation, the MLPs' separate gate and up and
    activation, q_a and kv_a apart in the default; the fused ops instead with every switch on."""
    default, every = default_and_all
    assert default["ops"]["torch.ops.aten.bmm"] == 6  # W_UK and W_UV of three layers, as cuBLAS calls on a GPU
    assert "torch.ops.aten.bmm" not in every["ops"] and every["ops"]["torch.ops.hf_deepseek.head_matmul"] == 6
    assert every["ops"]["torch.ops.hf_deepseek.linear_gemv_pair"] == 3
    assert every["ops"]["torch.ops.hf_deepseek.gate_up_gemv"] == 3
    assert launches(every) <= launches(default) - 3 * 3, (launches(every), launches(default))
