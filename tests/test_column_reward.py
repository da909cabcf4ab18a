"""Tests for the dense addition reward `column_reward`: the cold start's own solutions score 1.0, each wrong column
line costs its share, and text without column lines scores 0."""

import pytest

from hf_deepseek.data.r1 import cold_start_completion, grpo_row
from hf_deepseek.data.reasoning_tasks import task_examples
from hf_deepseek.trainers.rewards import REWARD_FUNCS, column_reward, column_score, get_reward_funcs

RIGHT = (
    "<think>Add column by column:\nones: 5 + 7 = 12, carry 1\ntens: 8 + 9 + 1 = 18, carry 1\n"
    "hundreds: 3 + 4 + 1 = 8\n385 + 497 = 882</think><answer>882</answer>"
)
PROMPT = [{"role": "user", "content": "Calculate 385 + 497.\nThink inside <think> </think>, then ..."}]


def test_cold_start_solutions_score_one():
    examples = list(task_examples("addition", 50, seed=5))
    rows = [grpo_row(example) for example in examples]
    completions = [cold_start_completion(example) for example in examples]
    rewards = column_reward([r["prompt"] for r in rows], completions, task=[r["task"] for r in rows])
    assert rewards == [1.0] * 50


@pytest.mark.parametrize(
    ("wrong", "right"),
    [
        ("ones: 5 + 7 = 12, carry 1", "ones: 5 + 7 = 13, carry 1"),  # wrong sum
        ("tens: 8 + 9 + 1 = 18, carry 1", "tens: 8 + 9 = 17, carry 1"),  # lost the incoming carry
        ("tens: 8 + 9 + 1 = 18, carry 1", "tens: 8 + 9 + 1 = 18"),  # lost the outgoing carry
        ("hundreds: 3 + 4 + 1 = 8", "hundreds: 3 + 5 + 1 = 9"),  # wrong digit of the problem
        ("hundreds: 3 + 4 + 1 = 8", "tens: 3 + 4 + 1 = 8"),  # wrong place (and tens twice)
    ],
)
def test_one_wrong_line_costs_a_third(wrong, right):
    assert column_score(RIGHT, 385, 497) == 1.0
    assert column_score(RIGHT.replace(wrong, right), 385, 497) == pytest.approx(2 / 3)


def test_skipped_and_extra_lines_count_as_wrong():
    skipped = RIGHT.replace("tens: 8 + 9 + 1 = 18, carry 1\n", "")
    assert column_score(skipped, 385, 497) == pytest.approx(2 / 3)
    extra = RIGHT.replace("385 + 497", "thousands: 1 = 1\n385 + 497")
    assert column_score(extra, 385, 497) == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "<think>Add column by column:\n385 + 497 = 882</think><answer>882</answer>", RIGHT[7:]],
)
def test_no_column_line_scores_zero(text):
    assert column_score(text, 385, 497) == 0.0


def test_lines_after_think_are_not_read():
    assert column_score("<think>x</think>" + RIGHT, 385, 497) == 0.0


def test_reward_skips_other_tasks_and_is_registered():
    assert column_reward([PROMPT, PROMPT], [RIGHT, "x"], task=["addition", "countdown"]) == [1.0, None]
    assert column_reward([[{"role": "user", "content": "no sum here"}]], [RIGHT]) == [None]
    assert REWARD_FUNCS["column"] is column_reward
    assert get_reward_funcs(["column"]) == [column_reward]
