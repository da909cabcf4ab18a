"""benchmarks/moe_gemv_tune.py's choice for the dense layers (CPU): each shape's launches a decode step, and the one
configuration per kind of weight with the least time over a step."""

import importlib.util
from pathlib import Path

from hf_deepseek.evals.bench import FULL_CONFIG

spec = importlib.util.spec_from_file_location(
    "moe_gemv_tune", Path(__file__).parents[1] / "benchmarks/moe_gemv_tune.py"
)
tune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune)


def test_dense_shapes_count_every_launch_of_a_decode_step():
    shapes = {name: (n, k, launches) for name, n, k, launches in tune.linear_shapes(FULL_CONFIG)}
    assert shapes["q_a"] == (1536, 2048, 8) and shapes["kv_a"] == (576, 2048, 8) and shapes["q_b"] == (3072, 1536, 8)
    assert shapes["shared gate / up"] == (2816, 2048, 14) and shapes["shared down"] == (2048, 2816, 7)
    assert shapes["dense gate / up"] == (10944, 2048, 2) and shapes["dense down"] == (2048, 10944, 1)


def test_per_step_picks_the_configuration_fastest_over_the_whole_step():
    def row(case, kind, config, us, launches, error=0.0):
        return dict(case=case, kernel=f"triton {kind} linear", config=config, us=us, launches=launches, error=error)

    rows = [
        dict(case="a", kernel="cuBLAS bf16 F.linear", us=10.0, launches=8),
        dict(case="b", kernel="cuBLAS bf16 F.linear", us=30.0, launches=1),
        # A is faster on the shape launched 8 times, B on the other: over a step A wins (8*4 + 40 < 8*6 + 30)
        row("a bf16", "bf16", (16, 256, 4, 1, 3), 4.0, 8), row("b bf16", "bf16", (16, 256, 4, 1, 3), 40.0, 1),
        row("a bf16", "bf16", (32, 256, 4, 1, None), 6.0, 8), row("b bf16", "bf16", (32, 256, 4, 1, None), 30.0, 1),
        # C is fastest but wrong on one shape, D missing a shape: neither can be chosen
        row("a bf16", "bf16", (8, 256, 4, 1, 3), 1.0, 8), row("b bf16", "bf16", (8, 256, 4, 1, 3), 1.0, 1, error=0.5),
        row("a bf16", "bf16", (16, 128, 4, 1, 4), 0.5, 8),
        row("a fp8", "fp8", (16, 256, 4, 1, 3), 2.0, 8), row("b fp8", "fp8", (16, 256, 4, 1, 3), 9.0, 1),
    ]  # fmt: skip
    summary = tune.per_step(rows)
    assert summary["cuBLAS bf16"] == 110.0
    assert summary["bf16"] == {"config": [16, 256, 4, 1, 3], "us": 72.0}
    assert summary["fp8"] == {"config": [16, 256, 4, 1, 3], "us": 25.0}
    assert "head_fp8" not in summary
    # the LM head (`--head`): left out of the step's sum, its own fastest FP8 configuration beside cuBLAS's bf16 head
    head = "lm head [129280, 2048] x 1"
    rows += [
        dict(case=head, kernel="cuBLAS bf16 F.linear", us=180.0, launches=1),
        row(f"{head} fp8", "fp8", (16, 256, 4, 1, 3), 150.0, 1), row(f"{head} fp8", "fp8", (64, 256, 8, 1, 3), 95.0, 1),
        row(f"{head} bf16", "bf16", (16, 256, 4, 1, 3), 170.0, 1),
    ]  # fmt: skip
    with_head = tune.per_step(rows)
    assert {k: with_head[k] for k in summary} == summary
    assert with_head["head_fp8"] == {"config": [64, 256, 8, 1, 3], "us": 95.0}
    assert with_head["head_cublas_bf16"] == 180.0
    assert tune.head_shape(FULL_CONFIG) == (tune.HEAD, FULL_CONFIG["vocab_size"], FULL_CONFIG["hidden_size"], 1)


def test_grouped_kernel_configurations_are_valid():
    """The quick list serves bf16 and FP8 weights alike (FP8: blocks dividing the 128x128 scale blocks); every one of
    the full list is a valid configuration for bf16 weights."""
    from hf_deepseek.kernels.moe_gemv_config import TUNED_GROUPED, grouped_config

    assert TUNED_GROUPED in tune.GROUPED_QUICK
    for config in tune.GROUPED_QUICK:
        assert grouped_config(config) == grouped_config(config, fp8=True)
    assert len({grouped_config(c) for c in tune.GROUPED_CONFIGS}) == len(tune.GROUPED_CONFIGS)


def test_rows_summary_picks_the_configuration_fastest_over_the_whole_step():
    def row(case, kind, config, us, launches, error=0.0):
        return dict(case=case, kernel=f"triton {kind} rows", config=config, us=us, launches=launches, error=error)

    rows = [
        dict(case="a fp8", kernel="FP8 GEMM path", us=20.0, launches=8),
        dict(case="b fp8", kernel="FP8 GEMM path", us=50.0, launches=1),
        dict(case="a bf16", kernel="cuBLAS bf16 F.linear", us=10.0, launches=8),
        dict(case="b bf16", kernel="cuBLAS bf16 F.linear", us=30.0, launches=1),
        row("a fp8", "fp8", (32, 16, 128, 4, 3), 4.0, 8), row("b fp8", "fp8", (32, 16, 128, 4, 3), 40.0, 1),
        row("a fp8", "fp8", (32, 32, 128, 4, 3), 6.0, 8), row("b fp8", "fp8", (32, 32, 128, 4, 3), 30.0, 1),
        row("a fp8", "fp8", (64, 16, 128, 4, 3), 1.0, 8), row("b fp8", "fp8", (64, 16, 128, 4, 3), 1.0, 1, 0.5),
        row("a fp8", "fp8", (16, 16, 128, 4, 3), 0.5, 8),  # (64, 16, ...) wrong on b, (16, 16, ...) missing b
        row("a bf16", "bf16", (32, 64, 128, 4, 3), 5.0, 8), row("b bf16", "bf16", (32, 64, 128, 4, 3), 20.0, 1),
    ]  # fmt: skip
    summary = tune.rows_per_step(rows)
    assert summary["cuBLAS bf16 F.linear"] == 110.0 and summary["FP8 GEMM path"] == 210.0
    assert summary["fp8 rows"] == {"config": [32, 16, 128, 4, 3], "us": 72.0}
    assert summary["bf16 rows"] == {"config": [32, 64, 128, 4, 3], "us": 60.0}


def test_rows_kernel_configurations_are_valid():
    from hf_deepseek.kernels.moe_gemv_config import UNTUNED_LINEAR_ROWS, linear_rows_config

    assert UNTUNED_LINEAR_ROWS in tune.LINEAR_ROWS_CONFIGS
    configs = {linear_rows_config(c, fp8=True) for c in tune.LINEAR_ROWS_CONFIGS}  # FP8's checks: both kinds serve
    assert len(configs) == len(tune.LINEAR_ROWS_CONFIGS)


def test_cold_timing_goes_round_enough_weight_copies_to_read_past_l2():
    import torch

    x, w = torch.ones(1, 8), torch.zeros(4, 8)
    variants = tune.cold_variants((x, w, None, (8, 256, 4)), nbytes=2 << 20)  # a 2 MB weight
    assert len(variants) == tune.L2_FLUSH_BYTES // (2 << 20)  # one pass reads L2_FLUSH_BYTES
    assert len({v[1].data_ptr() for v in variants}) == len(variants)  # every call reads weights of its own
    assert all(v[2] is None and v[3] == (8, 256, 4) and torch.equal(v[1], w) for v in variants)
    assert len(tune.cold_variants((x, w), nbytes=1 << 30)) == 20  # a large weight: the graph's 20 calls
    assert len(tune.cold_variants((x, w), nbytes=1)) == 512  # a tiny one: capped
