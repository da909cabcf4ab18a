"""Smoke test of `hf-deepseek demo`: every stage runs with tiny step counts and prints its figures."""

import math

import pytest

from hf_deepseek.cli import build_parser
from hf_deepseek.demo import DEFAULT_CHECKPOINT, DemoOptions, run_demo, wilson_interval


def test_demo_flags_scale_it_up():
    args = build_parser().parse_args(
        ["demo", "--device", "cuda", "--sft-steps", "500", "--steps", "200", "--set", "model.config.hidden_size=256"]
    )
    assert (args.device, args.sft_steps, args.grpo_steps) == ("cuda", 500, 200)
    assert args.overrides == ["model.config.hidden_size=256"] and args.recipe == "r1_tiny"
    assert build_parser().parse_args(["demo"]).checkpoint == DEFAULT_CHECKPOINT


def test_wilson_interval():
    low, high = wilson_interval(0, 500)
    assert low == 0 and math.isclose(high, 0.00762, abs_tol=1e-4)
    low, high = wilson_interval(40, 50)
    assert math.isclose(low, 0.6696, abs_tol=1e-3) and math.isclose(high, 0.8876, abs_tol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_short_demo_runs_every_stage(tmp_path, capsys):
    options = DemoOptions(sft_steps=3, grpo_steps=1, output_dir=str(tmp_path / "demo"), eval_limit=2, probe_prompts=1)
    results = run_demo(options)
    printed = capsys.readouterr().out
    assert (tmp_path / "demo" / "curves.png").is_file()
    assert (tmp_path / "demo" / "grpo" / "config.json").is_file()
    assert "SFT: training loss" in printed and "GRPO:" in printed and "make chat" in printed
    if "evaluation" in results:  # the demo's R1 model is shipped
        assert "greedy pass@1" in printed and "Latent KV cache" in printed and "accepted" in printed
        assert results["architecture"]["mha_bytes"] > results["architecture"]["cache_bytes"] > 0
