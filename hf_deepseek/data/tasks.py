"""Synthetic verifiable tasks: multi-digit addition and Countdown (reach a target with + - * /).

Every generator is deterministic in its seed, and a hash of each problem's key puts it in exactly
one split, so "train" and "test" never share a problem whatever the seeds.
"""

import ast
import hashlib
import random
from collections.abc import Iterator
from fractions import Fraction
from typing import Any, Literal

Split = Literal["train", "test"]
TEST_SHARE_PERCENT = 10
OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    """Exact arithmetic for one operator; raises ZeroDivisionError on `/ 0`."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def split_of(key: str) -> Split:
    """Return the split a problem belongs to, from a stable hash of its key."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < TEST_SHARE_PERCENT else "train"


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def addition_examples(n: int, seed: int, digits: int = 2, split: Split = "train") -> Iterator[dict[str, str]]:
    """Yield `n` problems like `{"prompt": "12+34=", "answer": "46"}`, operands of up to `digits` digits.

    `a+b` and `b+a` share a key, so they always land in the same split.
    """
    _check_split(split)
    rng = random.Random(seed)
    produced = 0
    while produced < n:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        if split_of(f"add:{min(a, b)}+{max(a, b)}") == split:
            produced += 1
            yield {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def _random_solution(numbers: list[int], rng: random.Random) -> tuple[Fraction, str]:
    """Combine all `numbers` in a random tree of random operators; return (value, expression)."""
    terms = [(Fraction(x), str(x), False) for x in numbers]  # (value, text, is_compound)
    while len(terms) > 1:
        i, j = sorted(rng.sample(range(len(terms)), 2))
        pair = [terms.pop(j), terms.pop(i)]
        rng.shuffle(pair)
        (va, ta, ca), (vb, tb, cb) = pair
        op = rng.choice("+-*/" if vb != 0 else "+-*")
        text = (f"({ta})" if ca else ta) + op + (f"({tb})" if cb else tb)
        terms.append((_apply(op, va, vb), text, True))
    return terms[0][0], terms[0][1]


def countdown_examples(
    n: int,
    seed: int,
    num_numbers: int = 3,
    split: Split = "train",
    max_number: int = 20,
    max_target: int = 100,
) -> Iterator[dict[str, Any]]:
    """Yield `n` Countdown problems: reach `target` using each of `numbers` once with + - * /.

    Each target is built from a random expression over the numbers, so it is reachable; that
    expression is the `answer` (any other expression that `verify_countdown` accepts is right too).
    """
    _check_split(split)
    if num_numbers not in (3, 4):
        raise ValueError(f"num_numbers must be 3 or 4, got {num_numbers}")
    rng = random.Random(seed)
    produced = 0
    while produced < n:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        value, expression = _random_solution(numbers, rng)
        if value.denominator != 1 or not 1 <= value <= max_target:
            continue
        target = int(value)
        if split_of(f"countdown:{sorted(numbers)}->{target}") != split:
            continue
        produced += 1
        yield {
            "prompt": f"Use {' '.join(map(str, numbers))} to make {target}.",
            "answer": expression,
            "numbers": numbers,
            "target": target,
        }


def _evaluate(node: ast.expr, used: list[int]) -> Fraction:
    """Evaluate a + - * / expression exactly, collecting the integer literals it uses."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return _apply(OPERATORS[type(node.op)], _evaluate(node.left, used), _evaluate(node.right, used))
    raise ValueError(f"not allowed in a Countdown answer: {ast.dump(node)}")


def verify_countdown(expression: str, numbers: list[int], target: int) -> bool:
    """True if `expression` uses each of `numbers` exactly once, only + - * /, and equals `target`."""
    if len(expression) > 200:
        return False
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return False
    return sorted(used) == sorted(numbers) and value == target
