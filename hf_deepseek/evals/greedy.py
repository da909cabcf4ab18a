"""Greedy pass@1 of a model on task rows, batched and left-padded as lm-eval's HF model does, without lm-eval:
for quick checks (the model card's test, validation sums while tuning a recipe: `benchmarks/greedy_pass_at_1.py`).
"""

from typing import Any

import torch

from hf_deepseek.evals.scoring import extract_answer, is_correct
from hf_deepseek.evals.task_data import prompt_text


@torch.inference_mode()
def greedy_pass_at_1(
    model, tokenizer, rows: list[dict[str, Any]], task: str = "addition", batch_size: int = 125, max_new_tokens=160
) -> float:
    """The share of `rows` whose greedy answer (chat template, `prompt_text` prompt) `is_correct`."""
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt_text(row)}], add_generation_prompt=True, tokenize=False
            )
            for row in batch
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, ids in zip(batch, out[:, inputs["input_ids"].shape[1] :], strict=True):
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            correct += is_correct(task, extract_answer(task, completion), row)
    return correct / len(rows)
