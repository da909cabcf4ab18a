"""benchmarks/fp8_quant_census.py on the CPU: the FP8 step's quantisations counted, and scaled to the bench, for the
recipe with the linear layers' weight gradient in bf16, which quantises no transposed activation or gradient."""

import importlib.util
import json
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "fp8_quant_census", Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_quant_census.py"
)
census = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = census  # its dataclasses look their module up
spec.loader.exec_module(census)


def test_census_of_the_step_with_bf16_weight_gradients(tmp_path, monkeypatch):
    out = tmp_path / "census.json"
    variant = "hf_deepseek-fp8-rowwise-triton-quant-hp-wgrad"
    monkeypatch.setattr(sys, "argv", ["fp8_quant_census.py", "--variant", variant, "--json", str(out)])
    census.main()
    summary = json.loads(out.read_text())["summary"]["after"]
    # every linear layer's input and output gradient quantised along their rows (forward, input gradient), the
    # weights in both orientations; no x^T or dy^T: the weight gradients take the bf16 operands
    assert "x^T" not in summary and "dy^T" not in summary
    assert summary["x"]["calls"] > 0 and summary["dy"]["calls"] > 0
    assert summary["weight"]["calls"] == summary["weight^T"]["calls"] > 0
    # the routed experts: their rows and gradient rows once a MoE layer (7 at the bench), their weights both ways
    assert summary["routed rows"]["calls"] == summary["routed grad rows"]["calls"] == 7
    assert summary["expert weights"]["calls"] == summary["expert weights^T"]["calls"] == 7
    assert all(row["GB"] > 0 and row["est_ms"] > 0 for row in summary.values())
