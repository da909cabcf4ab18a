"""The R1 template: prompts that ask for `<think>...</think><answer>...</answer>`, GRPO rows, and cold-start SFT
rows whose `<think>` holds a correct, readable step-by-step solution.

The user turn is the question followed by `INSTRUCTION`, exactly the text of the evaluation tasks
(`hf_deepseek.evals.task_data.prompt_text`), so a trained model sees the same prompt in training and evaluation.
`R1_SYSTEM_PROMPT` is DeepSeek-R1-Zero's own template text, optional because it costs ~400 tokens per prompt
with the character-level tokenizer.
"""

from fractions import Fraction
from typing import Any

from hf_deepseek.data.column_arithmetic import column_addition_lines, worked_lines
from hf_deepseek.data.expressions import Node, format_number, parse_expression

INSTRUCTION = "Think inside <think> </think>, then give the final answer inside <answer> </answer>."
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
SYSTEM_PROMPTS = {"none": None, "r1": R1_SYSTEM_PROMPT}


def user_content(question: str) -> str:
    """The user turn: the question, then the format to use (the evaluation tasks' prompt)."""
    return f"{question}\n{INSTRUCTION}\n"


def earlier_turns(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Earlier exchanges as the chat app sends them back (`hf_deepseek.app.messages.history_to_messages`): each
    question with the format instruction, each reply reduced to its `<answer>...</answer>` (reasoning dropped)."""
    turns = []
    for example in history:
        turns.append({"role": "user", "content": user_content(example["question"])})
        turns.append({"role": "assistant", "content": f"<answer>{example['answer']}</answer>"})
    return turns


def prompt_messages(
    question: str, system_prompt: str | None = None, history: list[dict[str, Any]] = ()
) -> list[dict[str, str]]:
    """The conversation up to the assistant's turn, after the `history` problems' exchanges."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, *earlier_turns(list(history)), {"role": "user", "content": user_content(question)}]


def _n(value: Fraction) -> str:
    return format_number(value)


def _product_lines(a: Fraction, b: Fraction) -> list[str]:
    """`a * b` for integers, splitting the second factor into its decimal places when both have 2+ digits."""
    lines = []
    x, y = abs(a), abs(b)
    if (a < 0) != (b < 0) and a and b:
        lines.append(f"One factor is negative, so the product is negative: first {_n(x)} * {_n(y)}.")
    elif a < 0 and b < 0:
        lines.append(f"Both factors are negative, so the product is positive: {_n(x)} * {_n(y)}.")
    if x.denominator == y.denominator == 1 and x >= 10 and y >= 10:
        digits = str(y.numerator)
        parts = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]
        if len(parts) > 1:
            split = " + ".join(f"{_n(x)} * {p}" for p in parts)
            sums = " + ".join(_n(x * p) for p in parts)
            lines.append(f"{_n(x)} * {_n(y)} = {split} = {sums} = {_n(x * y)}")
    lines.append(f"{_n(a)} * {_n(b)} = {_n(a * b)}")
    return lines


def _operation_lines(node: Node) -> list[str]:
    """One or more checked lines for the operation at `node` (its children are already valued)."""
    a, b = node.left.value, node.right.value
    if node.op == "*":
        return _product_lines(a, b)
    if node.op == "+" and b < 0:
        return [f"{_n(a)} + {_n(b)} = {_n(a)} - {_n(-b)} = {_n(a + b)}"]
    if node.op == "-" and b < 0:
        return [f"{_n(a)} - {_n(b)} = {_n(a)} + {_n(-b)} = {_n(a - b)}"]
    return [f"{_n(a)} {node.op} {_n(b)} = {_n(node.value)}"]


def evaluation_steps(node: Node) -> list[str]:
    """Lines that evaluate the tree bottom-up, innermost operations first; every `=` in them holds exactly."""
    if node.op is None:
        return []
    if node.op == "neg":
        inner = evaluation_steps(node.left)
        return inner if node.left.op is None else [*inner, f"-({_n(node.left.value)}) = {_n(node.value)}"]
    return [*evaluation_steps(node.left), *evaluation_steps(node.right), *_operation_lines(node)]


def _column_addition(expression: str) -> list[str]:
    a, b = (int(t) for t in expression.split("+"))
    return column_addition_lines(a, b)


def solution_steps(example: dict[str, Any]) -> str:
    """The readable reasoning for a problem from `task_examples` (the text inside `<think>`)."""
    task = example["task"]
    if task == "countdown":
        node = parse_expression(example["answer"])
        numbers = ", ".join(map(str, example["numbers"]))
        lines = [f"Numbers: {numbers}. Target: {example['target']}.", *evaluation_steps(node)]
        lines.append(f"That reaches {example['target']} using each number once.")
    elif task == "addition":
        lines = ["Add column by column:", *_column_addition(example["expression"])]
    elif task == "add_sub":
        expression = example["expression"]
        op, (a, b) = ("add", expression.split("+")) if "+" in expression else ("sub", expression.split("-"))
        lines = worked_lines(op, int(a), int(b))
    elif task == "arithmetic":
        node = parse_expression(example["expression"], allow_unary_minus=True)
        lines = [*evaluation_steps(node)] or [f"The value is {_n(node.value)}."]
    elif task == "gsm_symbolic":
        lines = [example["solution"], f"So the answer is {example['answer']}."]
    else:
        raise ValueError(f"no worked solutions for task {task!r}")
    return "\n".join(lines)


def cold_start_completion(example: dict[str, Any]) -> str:
    """`<think>steps</think><answer>answer</answer>` for a problem."""
    answer = example["answer"]
    if example["task"] == "countdown":
        answer = answer.replace(" ", "")
    return f"<think>{solution_steps(example)}</think><answer>{answer}</answer>"


def sft_row(example: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    """A conversational SFT row (`messages`) with the worked solution as the assistant turn."""
    messages = prompt_messages(example["question"], system_prompt)
    return {"messages": [*messages, {"role": "assistant", "content": cold_start_completion(example)}]}


def sft_turn_row(
    example: dict[str, Any], system_prompt: str | None = None, history: list[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A conversational prompt-completion SFT row: the conversation so far (`history` exchanges as the chat sends
    them, then the question) as `prompt`, the worked solution as `completion`; the loss is on the completion only."""
    return {
        "prompt": prompt_messages(example["question"], system_prompt, history),
        "completion": [{"role": "assistant", "content": cold_start_completion(example)}],
    }


def grpo_row(
    example: dict[str, Any], system_prompt: str | None = None, history: list[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A conversational GRPO row: the `prompt` (after the `history` exchanges), and the columns the rewards read
    (`task`, `answer`, `numbers`, `target`; the last two are empty outside Countdown, so rows of several tasks share
    one schema)."""
    return {
        "prompt": prompt_messages(example["question"], system_prompt, history),
        "task": example["task"],
        "answer": example["answer"],
        "numbers": list(example.get("numbers", [])),
        "target": example.get("target"),
    }
