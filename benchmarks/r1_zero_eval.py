"""Held-out greedy pass@1 and format rate of an R1-Zero model on 4-digit sums (the `add4` bucket of the `add_sub`
evaluation set), prompted as in GRPO: the question, the R1 instruction, and `<think>` opened (plain text, no chat).
Also what the thinking itself gets right, tags or not: the share whose line `a + b = sum` is right (`body_correct`),
worked column by column (`worked`) and closing `</think>` (`closes_think`). `--temperature 1` samples as GRPO does.

    python benchmarks/r1_zero_eval.py CHECKPOINT [CHECKPOINT ...] [--json out.json] [--device cuda] [--temperature T]
"""

import argparse
import json
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.data.r1_zero import zero_prompt
from hf_deepseek.demo import wilson_interval
from hf_deepseek.evals.task_data import load_rows
from hf_deepseek.trainers.rewards import accuracy_reward, opened_format_reward


def body_correct(text: str, row: dict) -> bool:
    """Whether the thinking has the line `a + b = sum` with the right sum, ending the line or followed at once by
    `</think>` (a completion that closes the block writes it on the same line: `7 + 7793 = 7800</think><answer>`)."""
    sum_line = re.escape(row["question"][len("Calculate ") : -1]) + " = " + re.escape(str(row["answer"]))
    return bool(re.search(rf"^{sum_line}(?:$|</think>)", text, re.M))


@torch.inference_mode()
def evaluate(path: str, device: str, limit: int = 500, temperature: float = 0.0) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    rows = [r for r in load_rows("add_sub")["test"] if r["bucket"] == "add4"][:limit]
    inputs = tokenizer([zero_prompt(r["question"]) for r in rows], return_tensors="pt", padding=True).to(device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature else {"do_sample": False}
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sampling)  # fmt: skip
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = accuracy_reward(None, texts, answer=[r["answer"] for r in rows], task=["add_sub"] * len(rows))
    formatted = opened_format_reward(None, texts)
    hits = int(sum(correct))
    n = len(rows)
    body = sum(body_correct(t, r) for t, r in zip(texts, rows, strict=True))
    result = {"correct": hits, "n": n, "pass@1": hits / n, "interval": wilson_interval(hits, n),
              "format": sum(formatted) / n, "body_correct": body / n,
              "worked": sum("column by column" in t for t in texts) / n,
              "closes_think": sum("</think>" in t for t in texts) / n, "temperature": temperature,
              "example": texts[0]}  # fmt: skip
    print(
        f"{path}: pass@1 {hits}/{n}, format {result['format']:.3f}, body right {result['body_correct']:.3f}, "
        f"worked {result['worked']:.3f}, closes </think> {result['closes_think']:.3f}; e.g. {texts[0]!r}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--json")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); 1: as GRPO samples")
    args = parser.parse_args()
    results = {path: evaluate(path, args.device, args.limit, args.temperature) for path in args.checkpoints}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
