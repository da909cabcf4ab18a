"""Addition and subtraction of 1- to 4-digit integers, worked column by column: the embedded default's task.

A problem's bucket is its operation and the digit count of its longer operand (`add3`: a sum whose longer operand
has 3 digits; the other operand has 1 to 3). A worked subtraction first compares its operands from the left; one that
goes below zero (`25 - 300`) then subtracts the other way round and negates. Problems are named `add:a+b` (both
orders share the name, as in `hf_deepseek.data.tasks.addition_examples`) or `sub:a-b` for the split hash, so
training never draws a held-out problem of buckets 2-4; bucket 1 (100 problems per operation) is too small to hold
any out and is trained on whole.
"""

import random
from collections.abc import Iterator
from typing import Any

from hf_deepseek.data.tasks import Split, _check_split, split_of

OPERATIONS = ("add", "sub")
SYMBOLS = {"add": "+", "sub": "-"}
DIGITS = (1, 2, 3, 4)
BUCKETS = tuple(f"{op}{d}" for op in OPERATIONS for d in DIGITS)
PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
# how users ask (the chat) besides the evaluation's `Calculate a + b.`; training draws from all of them
QUESTION_TEMPLATES = ("Calculate {a} {s} {b}.", "What is {a} {s} {b}?", "{a} {s} {b}", "{a}{s}{b}", "{a} {s} {b} =")


def _place(i: int) -> str:
    return PLACES[i] if i < len(PLACES) else f"10^{i}"


def problem_key(op: str, a: int, b: int) -> str:
    return f"add:{min(a, b)}+{max(a, b)}" if op == "add" else f"sub:{a}-{b}"


def bucket_of(op: str, a: int, b: int) -> str:
    return f"{op}{max(len(str(a)), len(str(b)))}"


def held_out(op: str, a: int, b: int) -> bool:
    """Whether a problem belongs to the evaluation side: the test side of the hash, except in bucket 1."""
    return max(a, b) >= 10 and split_of(problem_key(op, a, b)) == "test"


def column_addition_lines(a: int, b: int) -> list[str]:
    """`ones: 5 + 7 = 12, carry 1` ... `a + b = sum` (the lines `hf_deepseek.trainers.rewards.column_score` reads)."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [int(d[i]) for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        total = sum(terms)
        carry = total // 10
        lines.append(f"{_place(i)}: {' + '.join(map(str, terms))} = {total}" + (f", carry {carry}" if carry else ""))
    lines.append(f"{a} + {b} = {a + b}")
    return lines


def column_subtraction_lines(a: int, b: int) -> list[str]:
    """`a - b` for `a >= b`: per place, the top digit minus the bottom digit and the incoming borrow; a negative
    difference then adds 10 and borrows (`tens: 4 - 9 - 1 = -6, +10 = 4, borrow 1`), so whether a column borrows
    is read from a difference already written rather than decided before its first digit; then `a - b = difference`."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow = [], 0
    for i in range(len(da)):
        terms = [int(da[i])] + ([int(db[i])] if i < len(db) else []) + ([borrow] if borrow else [])
        difference = terms[0] - sum(terms[1:])
        text = f"{_place(i)}: {' - '.join(map(str, terms))} = {difference}"
        lines.append(text + (f", +10 = {difference + 10}, borrow 1" if difference < 0 else ""))
        borrow = int(difference < 0)
    lines.append(f"{a} - {b} = {a - b}")
    return lines


def _digits(n: int) -> str:
    return f"{n} digit" + ("s" if n > 1 else "")


def comparison_line(a: int, b: int) -> str:
    """Which of `a` and `b` is larger, worked from the left: the digit counts when they differ, else the digits
    pair by pair up to the first that differ (`Compare 858 with 827: 8 = 8, 5 > 2, so 858 > 827.`)."""
    sa, sb = str(a), str(b)
    if len(sa) != len(sb):
        steps = [f"{_digits(len(sa))} {'<' if len(sa) < len(sb) else '>'} {_digits(len(sb))}"]
    else:
        steps = []
        for x, y in zip(sa, sb, strict=True):
            steps.append(f"{x} {'<' if x < y else '>' if x > y else '='} {y}")
            if x != y:
                break
    relation = "<" if a < b else ">" if a > b else "="
    return f"Compare {a} with {b}: {', '.join(steps)}, so {a} {relation} {b}."


def worked_lines(op: str, a: int, b: int) -> list[str]:
    """The reasoning inside `<think>` for `a + b` or `a - b`. Each first restates its operands (so the columns read
    digits from the line above, not from a question among earlier turns); a subtraction compares them, and a
    negative one subtracts the other way round and negates."""
    if op == "add":
        return [f"Add {a} + {b} column by column:", *column_addition_lines(a, b)]
    if a >= b:
        return [comparison_line(a, b), "Subtract column by column:", *column_subtraction_lines(a, b)]
    return [
        comparison_line(a, b),
        f"So {a} - {b} = -({b} - {a}).",
        "Subtract column by column:",
        *column_subtraction_lines(b, a),
        f"{a} - {b} = {a - b}",
    ]


def question_text(op: str, a: int, b: int, template: str = QUESTION_TEMPLATES[0]) -> str:
    return template.format(a=a, b=b, s=SYMBOLS[op])


def make_problem(op: str, a: int, b: int, template: str = QUESTION_TEMPLATES[0]) -> dict[str, Any]:
    """A problem as `task_examples` yields it (`task` `add_sub`), with its bucket and operands."""
    answer = a + b if op == "add" else a - b
    return {
        "task": "add_sub",
        "question": question_text(op, a, b, template),
        "answer": str(answer),
        "expression": f"{a}{SYMBOLS[op]}{b}",
        "bucket": bucket_of(op, a, b),
    }


def _operands(rng: random.Random, digits: int) -> tuple[int, int]:
    """One operand of exactly `digits` digits, the other of 1 to `digits`, in random order."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    longer = rng.randrange(low, 10**digits)
    other_digits = rng.randint(1, digits)
    other = rng.randrange(0 if other_digits == 1 else 10 ** (other_digits - 1), 10**other_digits)
    return (longer, other) if rng.random() < 0.5 else (other, longer)


def add_sub_examples(
    n: int,
    seed: int,
    split: Split = "train",
    buckets: tuple[str, ...] = BUCKETS,
    varied: bool = True,
    weights: dict[str, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """`n` problems, each bucket drawn in proportion to its `weights` entry, by default its digit count (more
    digits, more steps to learn); `train` skips held-out problems, `test` yields only them (buckets 2-4). `varied`
    phrases each question with a random template (else `Calculate a + b.`)."""
    _check_split(split)
    rng = random.Random(seed)
    shares = [weights[b] if weights else int(b[3:]) for b in buckets]
    produced = 0
    while produced < n:
        bucket = rng.choices(buckets, weights=shares)[0]
        op, digits = bucket[:3], int(bucket[3:])
        a, b = _operands(rng, digits)
        if held_out(op, a, b) != (split == "test"):
            continue
        template = rng.choice(QUESTION_TEMPLATES) if varied else QUESTION_TEMPLATES[0]
        produced += 1
        yield make_problem(op, a, b, template)


def bucket_problems(bucket: str) -> list[dict[str, Any]]:
    """Every problem of a 1-digit bucket (100), in order: the exhaustive evaluation set of that bucket."""
    op = bucket[:3]
    return [make_problem(op, a, b) for a in range(10) for b in range(10)]
