"""Greedy pass@1 of a model on task rows, batched and left-padded as lm-eval's HF model does, without lm-eval:
for quick checks (the model card's test, validation sums while tuning a recipe: `benchmarks/greedy_pass_at_1.py`,
`benchmarks/add_sub_eval.py`).
"""

from typing import Any

import torch

from hf_deepseek.evals.scoring import extract_answer, is_correct
from hf_deepseek.evals.task_data import prompt_text


def conversation(
    row: dict[str, Any], earlier: dict[str, Any] | list[dict[str, Any]] | None = None
) -> list[dict[str, str]]:
    """The chat messages for a problem, optionally after one earlier exchange (a row) or several (a list of rows),
    each as the chat app sends it back: the earlier question, then its answer alone in `<answer>` tags."""
    exchanges = [] if earlier is None else [earlier] if isinstance(earlier, dict) else earlier
    messages = []
    for prior in exchanges:
        messages += [
            {"role": "user", "content": prompt_text(prior)},
            {"role": "assistant", "content": f"<answer>{prior['answer']}</answer>"},
        ]
    return [*messages, {"role": "user", "content": prompt_text(row)}]


@torch.inference_mode()
def greedy_correct(
    model,
    tokenizer,
    rows: list[dict[str, Any]],
    task: str = "addition",
    batch_size: int = 125,
    max_new_tokens: int = 160,
    earlier: list[dict[str, Any] | list[dict[str, Any]]] | None = None,
) -> list[bool]:
    """Whether each row's greedy answer (chat template, `prompt_text` prompt, after `earlier[i]`'s exchange or
    exchanges when given) `is_correct`."""
    tokenizer.padding_side = "left"
    correct = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        before = earlier[start : start + batch_size] if earlier is not None else [None] * len(batch)
        texts = [
            tokenizer.apply_chat_template(conversation(row, prior), add_generation_prompt=True, tokenize=False)
            for row, prior in zip(batch, before, strict=True)
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, ids in zip(batch, out[:, inputs["input_ids"].shape[1] :], strict=True):
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            correct.append(is_correct(task, extract_answer(task, completion), row))
    return correct


def greedy_pass_at_1(
    model, tokenizer, rows: list[dict[str, Any]], task: str = "addition", batch_size: int = 125, max_new_tokens=160
) -> float:
    """The share of `rows` whose greedy answer (chat template, `prompt_text` prompt) `is_correct`."""
    return sum(greedy_correct(model, tokenizer, rows, task, batch_size, max_new_tokens)) / len(rows)
