"""Reasoning traces for the `distill` recipe: sample a stronger model's replies to training-split problems and keep
the ones the rewards accept (well formatted and correct), as JSON lines for SFT.
"""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from hf_deepseek.data.r1 import prompt_messages
from hf_deepseek.trainers.rewards import accuracy_reward, format_reward


def accepted(row: dict[str, Any]) -> bool:
    """A trace row (`completion` plus the problem's columns) that is well formatted and correct."""
    columns = {"task": [row["task"]], "numbers": [row.get("numbers", [])], "target": [row.get("target")]}
    completions = [row["completion"]]
    correct = accuracy_reward(None, completions, answer=[row["answer"]], **columns)[0]
    return bool(correct) and bool(format_reward(None, completions)[0])


@torch.no_grad()
def generate_traces(
    teacher_dir: str,
    problems: Iterable[dict[str, Any]],
    path: str | Path,
    samples_per_problem: int = 4,
    max_new_tokens: int = 512,
    system_prompt: str | None = None,
    temperature: float = 0.7,
) -> int:
    """Sample `samples_per_problem` replies per problem from the teacher; write the accepted ones (one per problem
    at most) to `path`. Returns how many were written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_deepseek import register_auto_classes

    register_auto_classes()  # the teacher may be one of ours

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w") as out:
        for problem in problems:
            prompt = tokenizer.apply_chat_template(
                prompt_messages(problem["question"], system_prompt), add_generation_prompt=True, return_tensors="pt"
            )
            prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
            generated = model.generate(
                prompt.repeat(samples_per_problem, 1),
                attention_mask=torch.ones_like(prompt).repeat(samples_per_problem, 1),
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            for sample in generated[:, prompt.shape[1] :]:
                row = {**problem, "completion": tokenizer.decode(sample, skip_special_tokens=True)}
                if accepted(row):
                    out.write(json.dumps(row) + "\n")
                    written += 1
                    break
    return written


def load_traces(path: str | Path) -> list[dict[str, Any]]:
    """The accepted rows of a traces file."""
    with Path(path).open() as lines:
        return [row for row in map(json.loads, lines) if accepted(row)]
