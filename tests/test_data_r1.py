"""Tests for the trainers' data (hf_deepseek.data): reasoning-gym training problems that never meet the held-out
evaluation sets, the R1 prompt (the evaluation tasks' own), cold-start solutions whose every step is arithmetic
that holds, and the chat template's generation markers for assistant-only loss."""

import re

import pytest

from hf_deepseek.data import build_tokenizer, cold_start_completion, grpo_row, sft_row, split_of, task_examples
from hf_deepseek.data.expressions import parse_expression
from hf_deepseek.data.r1 import INSTRUCTION, user_content
from hf_deepseek.data.reasoning_tasks import GYM_OPTIONS, problem_keys, solve_countdown
from hf_deepseek.evals import task_data
from hf_deepseek.trainers.rewards import accuracy_reward, format_reward

SIZES = {"countdown": 40, "arithmetic": 150, "gsm_symbolic": 4, "addition": 150}  # gsm_symbolic: ~1 s a problem
# a chain like `33 * 20 + 33 * 2 = 660 + 66 = 726` (signs, brackets and spaces allowed)
CHAIN = re.compile(r"-?[\d(][\d +\-*/()]*(?:= *-?[\d(][\d +\-*/()]*)+")


@pytest.fixture(scope="module")
def examples():
    return {task: list(task_examples(task, n, seed=0)) for task, n in SIZES.items()}


def test_generators_are_deterministic_and_on_the_train_side(examples):
    for task, rows in examples.items():
        if task != "gsm_symbolic":  # slow to draw again; the same code path as the others
            assert rows == list(task_examples(task, SIZES[task], seed=0))
            assert rows[:10] != list(task_examples(task, 10, seed=1))
        keys = [problem_keys(task, row) for row in rows]
        assert all(split_of(key) == "train" for row_keys in keys for key in row_keys)
        assert len({k[0] for k in keys}) == len(rows)  # no repeats


def test_training_problems_never_meet_the_evaluation_sets(examples):
    assert GYM_OPTIONS["countdown"] == task_data.SOURCES["countdown"].options
    assert GYM_OPTIONS["arithmetic"] == task_data.SOURCES["arithmetic"].options
    for task in ("countdown", "arithmetic", "gsm_symbolic"):
        held_out = task_data.load_rows(task)["test"]
        eval_keys = {key for row in held_out for key in task_data.SOURCES[task].keys(row)}
        # the trainers name problems exactly as the evaluation sets do
        assert all(problem_keys(task, row) == task_data.SOURCES[task].keys(row) for row in held_out)
        train_keys = {key for row in examples[task] for key in problem_keys(task, row)}
        assert not train_keys & eval_keys
    addition_keys = {key for row in examples["addition"] for key in problem_keys("addition", row)}
    eval_sums = {k for row in task_data.load_rows("arithmetic")["test"] for k in problem_keys("arithmetic", row)}
    assert not addition_keys & eval_sums
    assert all(split_of(key) == "test" for key in eval_keys)


def test_prompt_is_the_evaluation_prompt():
    assert INSTRUCTION == task_data.INSTRUCTION
    assert user_content("Calculate 2 + 2.") == task_data.prompt_text({"question": "Calculate 2 + 2."})


def _check_chains(text: str) -> int:
    chains = CHAIN.findall(text)
    for chain in chains:
        values = {parse_expression(side.strip(), allow_unary_minus=True).value for side in chain.split("=")}
        assert len(values) == 1, chain
    return len(chains)


@pytest.mark.parametrize("task", sorted(SIZES))
def test_cold_start_solutions_are_correct_and_every_step_holds(examples, task):
    rows = examples[task]
    completions = [cold_start_completion(row) for row in rows]
    columns = {
        "task": [task] * len(rows),
        "numbers": [row.get("numbers", []) for row in rows],
        "target": [row.get("target") for row in rows],
    }
    assert accuracy_reward(None, completions, answer=[row["answer"] for row in rows], **columns) == [1.0] * len(rows)
    assert format_reward(None, completions) == [1.0] * len(rows)
    if task != "gsm_symbolic":  # its worked steps are reasoning-gym's prose with units
        for completion in completions:
            think = completion.split("</think>")[0]
            assert _check_chains(think) >= 1, completion


def test_countdown_solver():
    assert solve_countdown([8, 1, 20, 1], 11) is not None
    assert parse_expression(solve_countdown([3, 7, 25], 54)).value == 54
    assert solve_countdown([2, 3], 100) is None


def test_rows_for_the_trainers(examples):
    countdown, arithmetic = examples["countdown"][0], examples["arithmetic"][0]
    row = grpo_row(countdown)
    assert row["prompt"] == [{"role": "user", "content": user_content(countdown["question"])}]
    assert row["numbers"] == countdown["numbers"] and row["target"] == countdown["target"]
    assert grpo_row(arithmetic)["numbers"] == [] and grpo_row(arithmetic)["target"] is None
    messages = sft_row(arithmetic, system_prompt="S")["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_chat_template_marks_assistant_replies_for_the_loss():
    tokenizer = build_tokenizer()
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>1+1=2</think><answer>2</answer>"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [tokenizer.decode([i]) for i, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert "".join(trained) == "<think>1+1=2</think><answer>2</answer><|eos|>4<|eos|>"
