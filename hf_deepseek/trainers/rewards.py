"""Rule-based rewards for GRPO: small pure functions with TRL's reward signature, and a name -> function registry.

Signature: `f(prompts, completions, completion_ids=None, **columns) -> list[float | None]`, where `columns` are
the dataset's other columns (`task`, `answer`, `numbers`, `target`, see `hf_deepseek.data.r1.grpo_row`); None
means "does not apply to this row". Completions are strings or conversations (the text of the last message is
scored). Every function is linear in the completion's length and caps what it parses: a 1 MB completion or a
pathological expression costs milliseconds, and model text is never evaluated.
"""

import math
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from hf_deepseek.data.expressions import ExpressionError, countdown_value, parse_expression

RewardFunc = Callable[..., list[float | None]]
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
MAX_ANSWER_CHARS = 200  # longer answers are wrong without being parsed
INTEGER_TASKS = {"addition", "arithmetic", "add_sub"}
_INTEGER = re.compile(r"[+-]?\d{1,60}")
_NUMBER = re.compile(r"[+-]?\$?(?:\d{1,3}(?:,\d{3})+|\d{1,60})(?:\.\d{1,30})?")
_POWER = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*(\d*)")
MAX_POWERS, MAX_EXPONENT_DIGITS = 2, 3  # sympy expands 9**99999999 exactly: refuse such answers before parsing


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion: the string itself, or the content of a conversation's last message."""
    if isinstance(completion, str):
        return completion
    if completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else ""
    return ""


def extract_answer(text: str) -> str | None:
    """The stripped content of the last complete `<answer>...</answer>`, or None."""
    end = text.rfind(ANSWER_CLOSE)
    start = text.rfind(ANSWER_OPEN, 0, end) if end >= 0 else -1
    return text[start + len(ANSWER_OPEN) : end].strip() if start >= 0 else None


def is_well_formatted(text: str) -> bool:
    """`<think>reasoning</think><answer>non-empty answer</answer>`, each tag exactly once, nothing around but
    whitespace (the rule of `hf_deepseek.evals.scoring.is_well_formatted`, checked without a regex)."""
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    body = text.strip()
    if not body.startswith(THINK_OPEN) or not body.endswith(ANSWER_CLOSE):
        return False
    think_end, answer_start = body.find(THINK_CLOSE), body.find(ANSWER_OPEN)
    return (
        think_end < answer_start
        and not body[think_end + len(THINK_CLOSE) : answer_start].strip()
        and bool(body[answer_start + len(ANSWER_OPEN) : -len(ANSWER_CLOSE)].strip())
    )


def _as_number(text: str) -> Fraction | None:
    """`-1,234`, `12.50`, `$7` -> an exact number; None for anything else (including `3/4`: see math-verify)."""
    if _NUMBER.fullmatch(text) is None:
        return None
    return Fraction(text.replace(",", "").replace("$", ""))


def _cheap_to_verify(text: str) -> bool:
    """No power towers or huge exponents (`9**9**9**9`, `9**99999999`), which sympy would try to expand."""
    powers = _POWER.findall(text)
    return len(powers) <= MAX_POWERS and all(len(digits) <= MAX_EXPONENT_DIGITS for digits in powers)


def _math_verify(gold: str, predicted: str) -> bool:
    """math-verify's symbolic equivalence, with its signal-based timeout where signals work (the main thread)."""
    if not _cheap_to_verify(predicted):
        return False
    from math_verify import parse, verify

    timeout = 2 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(
            verify(
                parse(gold, parsing_timeout=timeout), parse(predicted, parsing_timeout=timeout), timeout_seconds=timeout
            )
        )
    except Exception:  # malformed or pathological input (math-verify raises many kinds): not a correct answer
        return False


def countdown_correct(answer: str, numbers: Sequence[int], target: int) -> bool:
    """A Countdown answer (`expr` or `expr = target`) uses each number once with + - * / and equals the target."""
    value = countdown_value(answer.split("=")[0], list(numbers))
    return value is not None and value == target


def answer_is_correct(answer: str | None, gold: str, task: str | None = None, **row: Any) -> bool:
    """Countdown: a valid expression; integer tasks: the same integer; others: the same number, or an answer
    math-verify finds equivalent (LaTeX, fractions, expressions)."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return False
    if task == "countdown":
        return countdown_correct(answer, row["numbers"], row["target"])
    if task in INTEGER_TASKS:
        return _INTEGER.fullmatch(answer) is not None and int(answer) == int(gold)
    predicted, expected = _as_number(answer), _as_number(gold)
    if predicted is not None and expected is not None:
        return predicted == expected
    return _math_verify(gold, answer)


def _rows(n: int, columns: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-completion dicts of the dataset columns (TRL passes each column as a list)."""
    return [{key: values[i] for key, values in columns.items() if isinstance(values, list)} for i in range(n)]


def accuracy_reward(prompts, completions, completion_ids=None, answer=None, **columns) -> list[float | None]:
    """1.0 if the last `<answer>` solves the problem, else 0.0; None for rows without a reference answer."""
    if answer is None:
        raise ValueError("accuracy_reward needs an `answer` column")
    rewards = []
    for completion, gold, row in zip(completions, answer, _rows(len(completions), columns), strict=True):
        if gold is None:
            rewards.append(None)
            continue
        extracted = extract_answer(completion_text(completion))
        rewards.append(float(answer_is_correct(extracted, str(gold), **row)))
    return rewards


def format_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1.0 for `<think>...</think><answer>...</answer>` with each tag once, else 0.0."""
    return [float(is_well_formatted(completion_text(c))) for c in completions]


def opened_format_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """`format_reward` for a prompt that already opened `<think>` (R1-Zero's): 1.0 when `<think>` + the completion
    is `<think>...</think><answer>...</answer>` with each tag once, else 0.0."""
    return [float(is_well_formatted(THINK_OPEN + completion_text(c))) for c in completions]


def tag_count_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """0.25 for each of the four tags that appears exactly once: a denser signal on the way to the format."""
    return [sum(0.25 for tag in TAGS if completion_text(c).count(tag) == 1) for c in completions]


def countdown_reward(
    prompts, completions, completion_ids=None, numbers=None, target=None, task=None, **columns
) -> list[float | None]:
    """TinyZero's Countdown reward: 1.0 for a correct expression in `<answer>`, 0.1 for an answer that is an
    arithmetic expression but wrong (or in a malformed reply), 0.0 otherwise; None for non-Countdown rows."""
    if numbers is None or target is None:
        raise ValueError("countdown_reward needs `numbers` and `target` columns")
    rewards: list[float | None] = []
    for i, completion in enumerate(completions):
        if (task is not None and task[i] != "countdown") or target[i] is None:
            rewards.append(None)
            continue
        answer = extract_answer(completion_text(completion))
        if answer is None or len(answer) > MAX_ANSWER_CHARS:
            rewards.append(0.0)
        elif countdown_correct(answer, numbers[i], target[i]):
            rewards.append(1.0)
        else:
            try:
                parse_expression(answer.split("=")[0])
                rewards.append(0.1)
            except ExpressionError:
                rewards.append(0.0)
    return rewards


# the column lines of the addition cold start (`hf_deepseek.data.r1`): "tens: 8 + 9 + 1 = 18, carry 1"
PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
_COLUMN_LINE = re.compile(
    r"\s*([a-z-]{3,17}|10\^\d{1,2}):"  # the place
    r"\s*(\d{1,2}(?:\s*\+\s*\d{1,2}){0,3})\s*=\s*(\d{1,3})"  # its digits and incoming carry, their sum
    r"(?:\s*,\s*carry\s+(\d{1,2}))?\s*"  # the outgoing carry, if any
)
_ADDITION = re.compile(r"(\d{1,18})\s*\+\s*(\d{1,18})")
MAX_THINK_CHARS = 4000  # ~600 characters for two 18-digit numbers; what follows is not read


def _place(i: int) -> str:
    return PLACES[i] if i < len(PLACES) else f"10^{i}"


def column_steps(a: int, b: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """The right column lines of `a + b`, lowest place first: (place, terms: the digits then the incoming carry if
    any, sum, outgoing carry)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = tuple(int(d[i]) for d in (da, db) if i < len(d)) + ((carry,) if carry else ())
        total = sum(terms)
        carry = total // 10
        steps.append((_place(i), terms, total, carry))
    return steps


def _prompt_text(prompt) -> str:
    """The last user turn of a conversational prompt, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
    return ""


def column_score(text: str, a: int, b: int) -> float:
    """The share of the column lines of `text`'s `<think>` that are right for `a + b` (the place's digits, the
    incoming carry, the sum and the outgoing carry), out of the more of the lines written and the columns the sum
    has: a skipped column, a repeated place or an extra line counts as a wrong line; 0.0 if no line parses."""
    start = text.find(THINK_OPEN)
    if start < 0:
        return 0.0
    body = text[start + len(THINK_OPEN) : start + len(THINK_OPEN) + MAX_THINK_CHARS]
    end = body.find(THINK_CLOSE)
    body = body if end < 0 else body[:end]
    expected = {place: (terms, total, carry) for place, terms, total, carry in column_steps(a, b)}
    written, right, seen = 0, 0, set()
    for line in body.splitlines():
        match = _COLUMN_LINE.fullmatch(line)
        if match is None:
            continue
        written += 1
        place, terms, total, carry = match.groups()
        got = (tuple(int(t) for t in terms.split("+")), int(total), int(carry or 0))
        if place in expected and place not in seen and got == expected[place]:
            right += 1
        seen.add(place)
    return right / max(written, len(expected)) if written else 0.0


def column_reward(prompts, completions, completion_ids=None, task=None, **columns) -> list[float | None]:
    """Dense reward for column-by-column addition: `column_score` of the completion for the sum in the prompt's
    last user turn (`Calculate 385 + 497.`); None for rows of other tasks or whose prompt has no `a + b`."""
    rewards: list[float | None] = []
    prompts = prompts if prompts is not None else [None] * len(completions)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        match = _ADDITION.search(_prompt_text(prompt)[:1000])
        if (task is not None and task[i] != "addition") or match is None:
            rewards.append(None)
            continue
        rewards.append(column_score(completion_text(completion), int(match[1]), int(match[2])))
    return rewards


def _lengths(completions, completion_ids) -> list[int]:
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


def make_cosine_reward(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
) -> RewardFunc:
    """Length-aware accuracy (Yeo et al. 2025, "Demystifying Long CoT"): along a cosine in length/max_len, a
    correct answer earns from `max_value_correct` (short) down to `min_value_correct` (long), a wrong one from
    `min_value_wrong` (short) up to `max_value_wrong` (long), so the model is not pushed to stop thinking early
    when it is wrong. Length in tokens when TRL passes `completion_ids`, else in characters."""

    def cosine_scaled_reward(prompts, completions, completion_ids=None, answer=None, **columns):
        correct = accuracy_reward(prompts, completions, answer=answer, **columns)
        rewards: list[float | None] = []
        for ok, length in zip(correct, _lengths(completions, completion_ids), strict=True):
            if ok is None:
                rewards.append(None)
                continue
            cosine = math.cos(min(length / max_len, 1.0) * math.pi)
            low, high = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
            rewards.append(low + 0.5 * (high - low) * (1.0 + cosine))
        return rewards

    return cosine_scaled_reward


def make_repetition_penalty(ngram_size: int = 3, max_penalty: float = -1.0, max_words: int = 20_000) -> RewardFunc:
    """`max_penalty` x the share of repeated word n-grams (Yeo et al. 2025): 0 for text without repeats. Only the
    first `max_words` words are read, which bounds the cost of a huge completion."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")

    def repetition_penalty_reward(prompts, completions, completion_ids=None, **columns):
        rewards = []
        for completion in completions:
            words = completion_text(completion).split(maxsplit=max_words)[:max_words]
            if len(words) < ngram_size:
                rewards.append(0.0)
                continue
            ngrams = list(zip(*(words[i:] for i in range(ngram_size)), strict=False))
            rewards.append((1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty)
        return rewards

    return repetition_penalty_reward


REWARD_FUNCS: dict[str, RewardFunc] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "opened_format": opened_format_reward,
    "tag_count": tag_count_reward,
    "countdown": countdown_reward,
    "column": column_reward,
    "cosine": make_cosine_reward(),
    "repetition": make_repetition_penalty(),
}
REWARD_FACTORIES: dict[str, Callable[..., RewardFunc]] = {
    "cosine": make_cosine_reward,
    "repetition": make_repetition_penalty,
}


def get_reward_funcs(specs: Sequence[str | dict[str, Any]]) -> list[RewardFunc]:
    """Reward functions by name; a dict `{name: cosine, max_len: 512}` builds a parameterised one."""
    funcs = []
    for spec in specs:
        name, options = (
            (spec, {}) if isinstance(spec, str) else (spec["name"], {k: v for k, v in spec.items() if k != "name"})
        )
        if name not in REWARD_FUNCS:
            raise ValueError(f"unknown reward {name!r}; known: {', '.join(REWARD_FUNCS)}")
        if options:
            if name not in REWARD_FACTORIES:
                raise ValueError(f"reward {name!r} takes no options, got {sorted(options)}")
            funcs.append(REWARD_FACTORIES[name](**options))
        else:
            funcs.append(REWARD_FUNCS[name])
    return funcs
