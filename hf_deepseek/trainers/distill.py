"""Reasoning traces for the `distill` recipe and R1's rejection sampling (`r1_add_sub`'s `sft_rejection`): sample a
model's replies to training-split problems and keep the ones the rewards accept (well formatted and correct), as JSON
lines for SFT.

A problem with a `history` (earlier problems' `question` and `answer`) is asked as a later turn of a conversation:
the earlier exchanges as the chat app sends them back (`hf_deepseek.data.r1.earlier_turns`), then its question; its
trace keeps that `history`, so the SFT row is the same conversation with the kept reply as the last turn.
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
    problems_per_batch: int = 1,
) -> int:
    """Sample `samples_per_problem` replies per problem from the teacher (on CUDA when there is one), on the chat
    template's rendering of `prompt_messages` (after the problem's `history` exchanges, if any), `problems_per_batch`
    problems a `generate` call (left-padded); write the accepted ones (one per problem at most) to `path`. Returns
    how many were written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_deepseek import register_auto_classes

    register_auto_classes()  # the teacher may be one of ours

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).to(device).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    partial = path.with_name(path.name + ".partial")  # renamed when complete: an interrupted run leaves no traces file
    tokenizer.padding_side = "left"  # every prompt ends where generation starts
    problems = list(problems)
    with partial.open("w") as out:
        for start in range(0, len(problems), problems_per_batch):
            batch = problems[start : start + problems_per_batch]
            texts = [
                tokenizer.apply_chat_template(
                    prompt_messages(p["question"], system_prompt, p.get("history", ())),
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for p in batch
            ]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            width = inputs["input_ids"].shape[1]
            generated = model.generate(
                inputs["input_ids"].repeat_interleave(samples_per_problem, 0).to(device),
                attention_mask=inputs["attention_mask"].repeat_interleave(samples_per_problem, 0).to(device),
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            samples = generated[:, width:].view(len(batch), samples_per_problem, -1)
            for problem, replies in zip(batch, samples, strict=True):
                for sample in replies:
                    row = {**problem, "completion": tokenizer.decode(sample, skip_special_tokens=True)}
                    if accepted(row):
                        out.write(json.dumps(row) + "\n")
                        written += 1
                        break
    partial.replace(path)
    return written


def load_traces(path: str | Path) -> list[dict[str, Any]]:
    """The accepted rows of a traces file."""
    with Path(path).open() as lines:
        return [row for row in map(json.loads, lines) if accepted(row)]
