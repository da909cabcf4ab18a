r"""Data for R1-Zero in miniature: plain-text pretraining documents for a base model, and the GRPO prompts that open
its thinking block.

A base model has seen arithmetic two ways: problems with bare answers (`1234 + 5678 = 6912`) and worked column
arithmetic as ordinary text. Its documents here are exactly that, without tags and without chat roles (`tagged_share`
mixes in documents that show the R1 template whole, instruction included, for attempts that give the base model a
prior over it). GRPO then gives the R1 instruction, then `Calculate a + b.` and `<think>` already opened, and rewards
only the answer and the format. The instruction comes first so that the question sits right before the thinking, as
it sits right before the answer in every pretraining document: with the instruction between them, a base model that
never saw it miscopied the operands and answered no 4-digit sum right (docs/r1_add_sub.md).

`lead_share` puts a short line from `LEADS` between the question and the body. Without it the body always starts one
token (`\n`) after the question; a small base learned to copy the operands by that distance and, after the prompt's
`\n<think>`, read them one position off (`Calculate 38 + 2.` -> `3 + 2 = 35`). Leads make it find them by content.
"""

import random
from typing import Any

from hf_deepseek.data.column_arithmetic import worked_lines
from hf_deepseek.data.r1 import INSTRUCTION

THINK_OPEN = "<think>"
# plain-text lines a document may put between the question and its body: each a different length (the tokenizer is
# per character), so no fixed distance holds from the question's operands to the body's; no tags, no digits
LEADS = (
    " ",
    "OK. ",
    "Answer:\n",
    "Solution:\n",
    "Let's see.\n",
    "Work it out:\n",
    "Step by step:\n",
    "We add the two numbers.\n",
)


def _operands(expression: str) -> tuple[int, int]:
    a, b = expression.split("+")
    return int(a), int(b)


def pretraining_text(
    example: dict[str, Any], rng: random.Random, worked_share: float, tagged_share: float, lead_share: float = 0.0
) -> str:
    """One plain-text document for a sum: the question, then a bare answer or (with `worked_share`) the worked
    columns; with `tagged_share` the R1-Zero prompt (`zero_prompt`) followed by the same body and the answer,
    `...</think><answer>...</answer>`; with `lead_share` a line from `LEADS` right before the body (after the
    question line or after `<think>`). `lead_share=0` draws the same random numbers as before it existed."""
    a, b = _operands(example["expression"])
    worked = rng.random() < worked_share
    # worked as in the cold start of `r1_add_sub`, the operands restated right above the columns that read them
    body = "\n".join(worked_lines("add", a, b) if worked else [f"{a} + {b} = {a + b}"])
    if lead_share and rng.random() < lead_share:
        body = rng.choice(LEADS) + body
    if rng.random() < tagged_share:
        return f"{zero_prompt(f'Calculate {a} + {b}.')}{body}</think><answer>{a + b}</answer>\n"
    return f"Calculate {a} + {b}.\n{body}\n"


def zero_prompt(question: str) -> str:
    """The R1-Zero prompt: the format instruction, the question, and the thinking block opened."""
    return f"{INSTRUCTION}\n{question}\n{THINK_OPEN}"
