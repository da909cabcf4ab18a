"""Scoring for the reasoning tasks: answer extraction, correctness per task, format compliance, pass@k and maj@k.

Pure functions, no lm-eval import: the task YAMLs call them through `tasks/utils.py`, and the shipped
`evaluate` metric (`metrics/pass_at_k.py`) reuses `pass_at_k` and `majority_vote`.
"""

import ast
import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from fractions import Fraction
from typing import Any

from hf_deepseek.data import verify_countdown

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# <think>...</think> then <answer>...</answer>, nothing else around them but whitespace, no nested or repeated tags
_NO_TAG = r"(?:(?!</?think>|</?answer>).)"
FORMAT = re.compile(rf"\s*<think>{_NO_TAG}*</think>\s*<answer>{_NO_TAG}*\S{_NO_TAG}*</answer>\s*", re.DOTALL)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# a run of integers, operators, brackets and spaces with at least one operator between two integers
EXPRESSION = re.compile(r"[\d(][\d\s+\-*/()]*[+\-*/][\d\s+\-*/()]*[\d)]")
MAX_ANSWER_CHARS = 200


def extract_answer(task: str, completion: str) -> str | None:
    """The content of the last complete `<answer>...</answer>`; without one, a task-specific fallback.

    Fallback: the last number in the text (arithmetic, gsm_symbolic) or the last arithmetic expression
    (countdown). Returns None when nothing answer-like is found.
    """
    tagged = ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    pattern = EXPRESSION if task == "countdown" else NUMBER
    found = pattern.findall(completion)
    return found[-1].strip() if found else None


def is_well_formatted(completion: str) -> bool:
    """True for `<think>reasoning</think><answer>non-empty answer</answer>` (whitespace allowed around)."""
    return FORMAT.fullmatch(completion) is not None


def parse_number(text: str) -> Fraction | None:
    """An exact number from text like `-1,234`, `12.50`, `$7`, `3/4`, `42.`; None if it is not one."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(gold: str, prediction: str) -> bool:
    """math-verify's symbolic comparison, for answers that are not plain numbers (LaTeX, fractions, units)."""
    from math_verify import parse, verify

    try:
        return bool(verify(parse(gold), parse(prediction)))
    except Exception:  # math-verify raises on malformed or pathological input: such an answer is wrong
        return False


def _countdown_expression(answer: str) -> str:
    """`(25-7)*3 = 54` -> `(25-7)*3`: a model may restate the target after the expression."""
    return answer.split("=")[0].strip()


def is_correct(task: str, answer: str | None, doc: dict[str, Any]) -> bool:
    """Whether an extracted answer solves `doc` (Countdown: a valid expression; others: the same number)."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return False
    if task == "countdown":
        return verify_countdown(_countdown_expression(answer), doc["numbers"], doc["target"])
    gold, predicted = parse_number(doc["answer"]), parse_number(answer)
    if predicted is not None:
        return predicted == gold
    return _math_verify_equal(doc["answer"], answer)


def _countdown_claim(expression: str) -> Hashable:
    """What a Countdown expression claims: (the numbers it uses, its value); equal claims are the same answer."""
    used: list[int] = []

    def value(node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            left, right = value(node.left), value(node.right)
            ops = {ast.Add: left.__add__, ast.Sub: left.__sub__, ast.Mult: left.__mul__, ast.Div: left.__truediv__}
            return ops[type(node.op)](right)
        raise ValueError("not a + - * / expression")

    try:
        total = value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return expression
    return (tuple(sorted(used)), total)


def canonical_answer(task: str, answer: str | None) -> Hashable | None:
    """The identity of an answer for majority voting: equal numbers vote together, and so do Countdown
    expressions that use the same numbers to reach the same value."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    if task == "countdown":
        return _countdown_claim(_countdown_expression(answer))
    number = parse_number(answer)
    return number if number is not None else answer.strip()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(votes: Sequence[Hashable | None]) -> int | None:
    """Index of the first sample holding the most common non-None vote (ties: the earliest); None if no votes."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, v in enumerate(votes) if v is not None and counts[v] == best)


def score_greedy(task: str, doc: dict[str, Any], completion: str) -> dict[str, float]:
    """pass@1 and format compliance of one greedy completion."""
    return {
        "pass@1": float(is_correct(task, extract_answer(task, completion), doc)),
        "format": float(is_well_formatted(completion)),
    }


def score_samples(task: str, doc: dict[str, Any], completions: Sequence[str], ks: Sequence[int]) -> dict[str, float]:
    """pass@k for each k in `ks` (unbiased, over all n samples), maj@n, and the share of well-formatted samples."""
    n = len(completions)
    answers = [extract_answer(task, c) for c in completions]
    correct = [is_correct(task, a, doc) for a in answers]
    winner = majority_vote([canonical_answer(task, a) for a in answers])
    scores = {f"pass@{k}": pass_at_k(n, sum(correct), k) for k in ks}
    scores[f"maj@{n}"] = float(winner is not None and correct[winner])
    scores["format"] = sum(map(is_well_formatted, completions)) / n
    return scores
