"""Data for R1-Zero in miniature: plain-text pretraining documents for a base model, and the GRPO prompts that open
its thinking block.

A base model has seen arithmetic two ways: problems with bare answers (`1234 + 5678 = 6912`) and worked column
arithmetic as ordinary text. Its documents here are exactly that, without tags and without chat roles (`tagged_share`
mixes in documents that show the R1 tags, for attempts that give the base model a prior over them). GRPO then asks
`Calculate a + b.` with the R1 instruction and `<think>` already opened, and rewards only the answer and the format.
"""

import random
from typing import Any

from hf_deepseek.data.column_arithmetic import column_addition_lines
from hf_deepseek.data.r1 import INSTRUCTION

THINK_OPEN = "<think>"


def _operands(expression: str) -> tuple[int, int]:
    a, b = expression.split("+")
    return int(a), int(b)


def pretraining_text(example: dict[str, Any], rng: random.Random, worked_share: float, tagged_share: float) -> str:
    """One plain-text document for a sum: the question, then a bare answer or (with `worked_share`) the worked
    columns; with `tagged_share` the same inside `<think>...</think><answer>...</answer>`."""
    a, b = _operands(example["expression"])
    worked = rng.random() < worked_share
    body = "\n".join(["Add column by column:", *column_addition_lines(a, b)] if worked else [f"{a} + {b} = {a + b}"])
    if rng.random() < tagged_share:
        body = f"{THINK_OPEN}{body}</think><answer>{a + b}</answer>"
    return f"Calculate {a} + {b}.\n{body}\n"


def zero_prompt(question: str) -> str:
    """The R1-Zero prompt: the question, the format instruction, and the thinking block opened."""
    return f"{question}\n{INSTRUCTION}\n{THINK_OPEN}"
