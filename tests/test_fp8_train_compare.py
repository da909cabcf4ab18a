"""benchmarks/fp8_train_compare.py on the CPU (tiny shape, emulated FP8): with several seeds each seed trains bf16
and the recipe on its own weights and batches, and the reported difference pools every seed's runs."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "fp8_train_compare", Path(__file__).parents[1] / "benchmarks/fp8_train_compare.py"
)
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_seeds_train_apart_and_pool_into_one_difference(tmp_path, monkeypatch):
    out = tmp_path / "curves.json"
    argv = ["fp8_train_compare.py", "--shape", "tiny", "--device", "cpu", "--steps", "3", "--tail", "2",
            "--seeds", "0,1", "--recipes", "rowwise", "--json", str(out),
            "--plot", str(tmp_path / "c.png")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    result = json.loads(out.read_text())
    by_seed = result["curves_by_seed"]
    assert result["seeds"] == [0, 1] and set(by_seed) == {"0", "1"}
    assert by_seed["0"]["bf16"] != by_seed["1"]["bf16"]  # other weights and batches
    assert result["curves"] == by_seed["0"]
    per_seed = [100 * (sum(s["fp8-rowwise"]) - sum(s["bf16"])) / sum(s["bf16"]) for s in by_seed.values()]
    assert result["mean_loss_difference_percent_per_seed"]["fp8-rowwise"] == per_seed
    mean = {n: statistics.fmean(sum(s[n]) / 3 for s in by_seed.values()) for n in ("bf16", "fp8-rowwise")}
    pooled = 100 * (mean["fp8-rowwise"] - mean["bf16"]) / mean["bf16"]
    assert abs(result["mean_loss_difference_percent"]["fp8-rowwise"] - pooled) < 1e-9
    assert result["spread_across_seeds_percent"]["fp8-rowwise"] == statistics.stdev(per_seed)
    assert (tmp_path / "c.png").stat().st_size > 0


def test_the_time_budget_counts_from_the_end_of_the_first_step(tmp_path, monkeypatch):
    """`--max-seconds 0`: the first step (a compile's, when compiled) is not counted, so every run stops after the
    next one, and the comparison covers those two steps."""
    out = tmp_path / "curves.json"
    argv = ["fp8_train_compare.py", "--shape", "tiny", "--device", "cpu", "--steps", "4", "--tail", "1",
            "--recipes", "rowwise", "--max-seconds", "0", "--json", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["requested_steps"] == 4
    assert result["steps_done"] == {"bf16": 2, "fp8-rowwise": 2}
