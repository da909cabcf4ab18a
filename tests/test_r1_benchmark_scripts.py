"""Pure helpers of the R1 benchmark scripts: what `r1_zero_eval.py` counts as a right `a + b = sum` line, and how
`grpo_advantage_split.py` splits one batch's positive-advantage push between correct and wrong completions."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_r1_zero_eval_body_line_may_end_with_the_closing_think_tag():
    body_correct = load("r1_zero_eval").body_correct
    row = {"question": "Calculate 7 + 7793.", "answer": "7800"}
    closed = "Add 7 + 7793 column by column:\nones: 7 + 3 = 10, carry 1\n7 + 7793 = 7800</think><answer>7800</answer>"
    assert body_correct(closed, row)
    assert body_correct("ones: 7 + 3 = 10\n7 + 7793 = 7800\n", row)
    assert not body_correct("7 + 7793 = 78001</think>", row)  # a longer (wrong) sum
    assert not body_correct("17 + 7793 = 7800\n", row)  # other operands
    assert not body_correct("7 + 7793 = 7799</think><answer>7800</answer>", row)


def test_advantage_split_pushes_wrong_completions_only_where_the_format_alone_varies():
    split = load("grpo_advantage_split").split
    rows = [{"text": "x", "ids": [0] * n} for n in (10, 20, 30, 40, 10, 20, 30, 40)]
    # group 1: one right answer among wrong ones, all well formatted -> all the push on the right one
    # group 2: no right answer, one completion badly formatted -> the three formatted wrong ones are pushed up
    rewards = [[1, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 0]]
    result = split(rows, rewards, [1.0, 0.5], generations=4)
    assert result["groups"] == 2 and result["groups_without_variance"] == 0
    assert result["groups_with_a_correct_completion"] == 1
    assert result["wrong_completions_pushed"] == 3
    assert result["push_on_correct"] + result["push_on_wrong"] == pytest.approx(1.0)
    # each group's positive advantages sum to the same amount here (one outlier of four), so the push splits evenly
    assert result["push_on_correct"] == pytest.approx(0.5, abs=1e-3)
    assert result["accuracy"] == pytest.approx(1 / 8) and result["mean_length_correct"] == 10
