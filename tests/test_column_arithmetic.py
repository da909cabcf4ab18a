"""The embedded default's task: 1- to 4-digit addition and subtraction worked column by column, its splits, its
multi-turn cold-start rows (earlier turns exactly as the chat app sends them) and its evaluation set."""

import random
import re

from hf_deepseek.app.messages import history_to_messages
from hf_deepseek.data.column_arithmetic import (
    BUCKETS,
    add_sub_examples,
    bucket_of,
    column_subtraction_lines,
    held_out,
    problem_key,
    worked_lines,
)
from hf_deepseek.data.r1 import cold_start_completion, sft_turn_row, user_content
from hf_deepseek.evals.task_data import load_rows
from hf_deepseek.trainers.recipes import with_history
from hf_deepseek.trainers.rewards import accuracy_reward, format_reward

LINE = re.compile(r"[a-z-]+: (\d+(?: [+-] \d+)*) = (-?\d+)(?:, carry (\d)|, \+10 = (\d), borrow 1)?")


def _check_columns(op: str, a: int, b: int) -> None:
    """Every column line holds, and the digits of the column results, read top-down, give the result."""
    lines = worked_lines(op, a, b)
    digits, carry = [], 0
    for line in lines:
        match = LINE.fullmatch(line)
        if not match:
            continue
        terms, value, carried, borrowed = match.groups()
        numbers = [int(t) for t in re.findall(r"\d+", terms)]
        signs = [1] + [1 if s == "+" else -1 for s in re.findall(r" ([+-]) ", terms)]
        assert sum(n * s for n, s in zip(numbers, signs, strict=True)) == int(value), line
        assert (int(value) < 0) == (borrowed is not None) and (borrowed is None or int(borrowed) == int(value) + 10)
        digits.append(int(value) % 10)
        carry = int(carried) if carried else 0
    magnitude = int("".join(map(str, reversed(digits)))) + carry * 10 ** len(digits)
    assert magnitude == abs(a + b if op == "add" else a - b)
    assert lines[-1] == f"{a} {'+' if op == 'add' else '-'} {b} = {a + b if op == 'add' else a - b}"


def test_worked_lines_are_right_for_random_and_edge_problems():
    rng = random.Random(0)
    cases = [("sub", 1000, 999), ("sub", 25, 300), ("sub", 7, 7), ("add", 9999, 9999), ("sub", 0, 5), ("add", 0, 0)]
    cases += [
        (rng.choice(["add", "sub"]), rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10**4)) for _ in range(500)
    ]
    for op, a, b in cases:
        _check_columns(op, a, b)
    assert column_subtraction_lines(1000, 999)[:2] == ["ones: 0 - 9 = -9, +10 = 1, borrow 1",
                                                        "tens: 0 - 9 - 1 = -10, +10 = 0, borrow 1"]  # fmt: skip
    assert worked_lines("sub", 25, 300)[:2] == ["Compare 25 with 300: 2 digits < 3 digits, so 25 < 300.",
                                                "So 25 - 300 = -(300 - 25)."]  # fmt: skip
    assert worked_lines("sub", 858, 827)[0] == "Compare 858 with 827: 8 = 8, 5 > 2, so 858 > 827."
    assert worked_lines("sub", 7, 7)[0] == "Compare 7 with 7: 7 = 7, so 7 = 7."
    assert worked_lines("add", 23, 54)[0] == "Add 23 + 54 column by column:"


def test_worked_subtraction_states_each_comparison_and_borrow_after_the_digits_it_follows_from():
    rng = random.Random(1)
    for _ in range(300):
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        compare = worked_lines("sub", a, b)[0]
        assert compare.endswith(f"so {a} {'<' if a < b else '>' if a > b else '='} {b}.")
        for line in worked_lines("sub", a, b):  # a borrow is written after the column's (negative) difference
            assert ", borrow 1" not in line or re.search(r" = -\d+, \+10 = \d, borrow 1$", line)


def test_bucket_weights_set_the_mix():
    problems = list(add_sub_examples(2000, seed=2, weights={"add1": 1, "sub4": 3}, buckets=("add1", "sub4")))
    share = sum(p["bucket"] == "sub4" for p in problems) / len(problems)
    assert 0.7 < share < 0.8


def test_buckets_mix_operand_lengths_and_training_never_draws_held_out_problems():
    problems = list(add_sub_examples(3000, seed=3))
    assert {p["bucket"] for p in problems} == set(BUCKETS)
    lengths = {tuple(sorted(len(t) for t in re.split(r"[+-]", p["expression"]))) for p in problems}
    assert (1, 4) in lengths and (2, 4) in lengths and (4, 4) in lengths
    for p in problems:
        op = "add" if "+" in p["expression"] else "sub"
        a, b = (int(t) for t in p["expression"].split("+" if op == "add" else "-"))
        assert not held_out(op, a, b) and bucket_of(op, a, b) == p["bucket"]
    held = list(add_sub_examples(200, seed=3, split="test"))
    assert all(p["bucket"][-1] != "1" for p in held)


def test_evaluation_set_has_500_held_out_problems_per_bucket_and_two_turn_rows():
    rows = load_rows("add_sub")
    for bucket in BUCKETS:
        chosen = [r for r in rows["test"] if r["bucket"] == bucket]
        assert len(chosen) == (100 if bucket.endswith("1") else 500)
        assert len({r["expression"] for r in chosen}) == len(chosen)
        assert all(r["question"].startswith("Calculate ") for r in chosen)
    assert len(rows["turns"]) == 500 and len(rows["context"]) >= 500
    rewards = accuracy_reward(None, [cold_start_completion(r) for r in rows["turns"]], answer=[r["answer"] for r in
                              rows["turns"]], task=["add_sub"] * 500)  # fmt: skip
    assert rewards == [1.0] * 500


def test_multi_turn_rows_carry_earlier_turns_as_the_chat_sends_them():
    problems = list(add_sub_examples(50, seed=1))
    paired = with_history({"multi_turn": 1.0, "max_earlier_turns": 2, "seed": 0}, problems)
    problem, history = paired[0]
    assert 1 <= len(history) <= 2
    row = sft_turn_row(problem, None, history)
    gradio_history = []  # what the chat app holds after those turns: the reasoning block, then the answer
    for earlier in history:
        gradio_history += [
            {"role": "user", "content": earlier["question"]},
            {"role": "assistant", "content": "worked steps", "metadata": {"title": "Reasoning"}},
            {"role": "assistant", "content": earlier["answer"]},
        ]
    sent = history_to_messages(gradio_history, answer_tags=True)
    sent = [{**m, "content": user_content(m["content"])} if m["role"] == "user" else m for m in sent]
    assert row["prompt"][:-1] == sent
    assert row["prompt"][-1] == {"role": "user", "content": user_content(problem["question"])}
    assert format_reward(None, [row["completion"][0]["content"]]) == [1.0]


def test_add_sub_tasks_are_registered_with_lm_eval():
    from hf_deepseek.evals.harness import task_manager

    names = {f"hfds_add_sub_{bucket}" for bucket in BUCKETS} | {"hfds_add_sub_turn1", "hfds_add_sub_turn2"}
    assert names <= set(task_manager().all_tasks)


def test_r1_zero_pretraining_text_has_no_tags_or_roles_and_the_prompt_opens_think():
    import random as stdlib_random

    from hf_deepseek.data.r1_zero import pretraining_text, zero_prompt
    from hf_deepseek.trainers.rewards import opened_format_reward

    rng = stdlib_random.Random(0)
    problems = list(add_sub_examples(200, seed=0, buckets=("add1", "add2", "add3", "add4")))
    texts = [pretraining_text(p, rng, worked_share=0.5, tagged_share=0.0) for p in problems]
    assert not any("<" in t or "|" in t for t in texts)
    assert any("ones:" in t for t in texts) and any("ones:" not in t for t in texts)
    tagged = [pretraining_text(p, rng, worked_share=0.5, tagged_share=1.0) for p in problems[:5]]
    assert all("<think>" in t and t.rstrip().endswith("</answer>") for t in tagged)
    # a tagged document is the GRPO prompt, then the solution: the question right before the thinking
    prompts = [zero_prompt(f"Calculate {p['expression'].replace('+', ' + ')}.") for p in problems[:5]]
    assert all(t.startswith(prompt) for t, prompt in zip(tagged, prompts, strict=True))
    assert zero_prompt("Calculate 1 + 2.").endswith("Calculate 1 + 2.\n<think>")
    assert opened_format_reward(
        None, ["1 + 2 = 3</think><answer>3</answer>", "<think>x</think><answer>3</answer>"]
    ) == [
        1.0,
        0.0,
    ]


def _zero_problems(count, seed=0):
    return list(add_sub_examples(count, seed=seed, buckets=("add1", "add2", "add3", "add4")))


def _ops(problem):
    a, b = problem["expression"].split("+")
    return int(a), int(b)


def _lead_of(text, a, b):
    """The lead of an untagged r1_zero pretraining document: what sits between its question line and its body (a
    worked `Add a + b column by column:` or the bare `a + b = sum`); '' for none."""
    from hf_deepseek.data.r1_zero import LEADS

    question = f"Calculate {a} + {b}.\n"
    assert text.startswith(question), text
    rest = text[len(question) :]
    starts = (f"Add {a} + {b} column by column:\n", f"{a} + {b} = {a + b}\n")
    if rest.startswith(starts):
        return ""
    leads = [lead for lead in LEADS if rest.startswith(lead) and rest[len(lead) :].startswith(starts)]
    assert len(leads) == 1, text
    return leads[0]


def test_r1_zero_lead_share_zero_keeps_the_documents_and_random_stream():
    from hf_deepseek.data.r1_zero import LEADS, pretraining_text

    problems = _zero_problems(200)
    for tagged_share in (0.0, 0.3):
        rng_default, rng_zero = random.Random(3), random.Random(3)
        default = [pretraining_text(p, rng_default, 0.5, tagged_share) for p in problems]
        zero = [pretraining_text(p, rng_zero, 0.5, tagged_share, lead_share=0.0) for p in problems]
        assert default == zero and rng_default.random() == rng_zero.random()
    rng = random.Random(0)
    for p in problems:  # untagged: the question line, then the body at once
        assert _lead_of(pretraining_text(p, rng, 0.5, 0.0), *_ops(p)) == ""
    assert len(set(LEADS)) == len(LEADS) == len({len(lead) for lead in LEADS})
    assert all(lead.endswith(("\n", " ")) and not any(c in lead for c in "<>|0123456789") for lead in LEADS)


def test_r1_zero_leads_sit_between_the_question_and_a_correct_body():
    from hf_deepseek.data.r1_zero import LEADS, pretraining_text, zero_prompt

    rng = random.Random(0)
    seen = set()
    for p in _zero_problems(300):
        a, b = _ops(p)
        text = pretraining_text(p, rng, 0.5, 0.0, lead_share=1.0)
        lead = _lead_of(text, a, b)
        assert lead in LEADS and "<" not in text
        seen.add(lead)
        assert text.endswith(f"{a} + {b} = {a + b}\n")  # the bare line or a worked doc's last line: the right sum
    assert seen == set(LEADS)
    # a lead moves the body's restated operands away from the question's by its length (a per-character tokenizer)
    text = pretraining_text({"expression": "38+2"}, random.Random(0), 0.0, 0.0, lead_share=1.0)
    assert text.index("38 + 2 =") - text.index("38 + 2.") > len("38 + 2.\n")
    # half the documents at lead_share=0.5
    rng = random.Random(1)
    problems = _zero_problems(2000, seed=1)
    leads = [_lead_of(pretraining_text(p, rng, 0.5, 0.0, lead_share=0.5), *_ops(p)) for p in problems]
    assert 0.45 <= sum(bool(lead) for lead in leads) / len(leads) <= 0.55
    # tagged documents: the zero prompt, then the lead and the body, then the answer
    rng = random.Random(2)
    for p in _zero_problems(100):
        a, b = _ops(p)
        text = pretraining_text(p, rng, 0.5, 1.0, lead_share=1.0)
        prompt = zero_prompt(f"Calculate {a} + {b}.")
        assert text.startswith(prompt) and text.endswith(f"</think><answer>{a + b}</answer>\n")
        after = text[len(prompt) :]
        assert any(
            after.startswith(lead) and after[len(lead) :].startswith((f"Add {a} + {b}", f"{a} + {b}")) for lead in LEADS
        )


def test_r1_zero_recipe_lead_share_reaches_the_pretraining_dataset():
    from hf_deepseek.trainers.recipes import apply_overrides, build_dataset, load_recipe

    assert load_recipe("r1_zero_tiny")["pretrain"]["data"]["lead_share"] == 0.5
    overrides = ["pretrain.data.tasks.add_sub=400", "pretrain.data.tagged_share=0.0"]
    plain_overrides = [*overrides, "pretrain.data.lead_share=0.0"]
    plain = build_dataset(apply_overrides(load_recipe("r1_zero_tiny"), "pretrain", plain_overrides), "pretrain")
    recipe = apply_overrides(load_recipe("r1_zero_tiny"), "pretrain", overrides)
    dataset = build_dataset(recipe, "pretrain")
    assert len(plain) == len(dataset) == 400
    operands = [tuple(int(x) for x in re.match(r"Calculate (\d+) \+ (\d+)\.", t).groups()) for t in dataset["text"]]
    assert not any(_lead_of(t, a, b) for t, (a, b) in zip(plain["text"], operands, strict=True))
    with_lead = sum(bool(_lead_of(t, a, b)) for t, (a, b) in zip(dataset["text"], operands, strict=True))
    assert 0.4 <= with_lead / len(dataset) <= 0.6


def test_larger_hardest_bucket_sets_are_held_out_and_disjoint_from_training():
    """`add4_2k` / `sub4_2k` (2,000 problems each, `benchmarks/add_sub_eval.py --large`, lm-eval
    `hfds_add_sub_{add4,sub4}_2k`): the bucket's 500 first, then distinct held-out problems that no training stage
    can draw (the recipes' problems come from `add_sub_examples`' train side, here at the recipes' own seeds)."""
    from hf_deepseek.evals.task_data import add_sub_set
    from hf_deepseek.evals.tasks.utils import add_sub_dataset
    from hf_deepseek.trainers.recipes import _problems, load_recipe

    splits = load_rows("add_sub")
    large_keys = set()
    for bucket in ("add4", "sub4"):
        rows = add_sub_set(splits, f"{bucket}_2k")
        assert len(rows) == 2000 and rows[:500] == add_sub_set(splits, bucket)
        assert {r["bucket"] for r in rows} == {bucket} and len({r["id"] for r in rows}) == 2000
        op = bucket[:3]
        operands = [tuple(map(int, re.fullmatch(r"(\d+)[+-](\d+)", r["expression"]).groups())) for r in rows]
        keys = {problem_key(op, a, b) for a, b in operands}
        assert len(keys) == 2000 and all(held_out(op, a, b) for a, b in operands)
        answers = [a + b if op == "add" else a - b for a, b in operands]
        assert [int(r["answer"]) for r in rows] == answers
        assert len(add_sub_dataset(rows=f"{bucket}_2k")["test"]) == 2000
        large_keys |= keys
    drawn = list(add_sub_examples(20000, seed=0, buckets=("add4", "sub4")))
    for recipe, stage in (("r1_add_sub", "sft"), ("r1_add_sub", "grpo"), ("r1_zero_tiny", "grpo")):
        data = {**load_recipe(recipe)[stage]["data"], "tasks": {"add_sub": 5000}}
        drawn += [p for p in _problems(data) if "bucket" in p]
    assert drawn
    for p in drawn:
        op = p["bucket"][:3]
        a, b = map(int, re.fullmatch(r"(\d+)[+-](\d+)", p["expression"]).groups())
        assert problem_key(op, a, b) not in large_keys


def test_larger_sets_are_registered_with_lm_eval_under_their_own_tag():
    from hf_deepseek.evals.harness import task_manager

    manager = task_manager()
    assert {"hfds_add_sub_add4_2k", "hfds_add_sub_sub4_2k"} <= set(manager.all_tasks)
