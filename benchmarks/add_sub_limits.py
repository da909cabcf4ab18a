"""Where an `add_sub` checkpoint stops being reliable, beyond the held-out buckets: subtractions whose operands
nearly cancel (the difference has fewer digits than the operands), and later turns of a longer conversation.

Greedy, chat template with the R1 instruction, earlier exchanges sent back as the chat app sends them
(`<answer>...</answer>` alone). The close-operand problems are drawn at random (seed 0); the conversations ask the
first `--turns` held-out `turns` problems after 1 to `--max-earlier` training-side exchanges.

    python benchmarks/add_sub_limits.py checkpoints/hf-deepseek-r1-add-sub --output outputs/add_sub_limits.json
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.data.column_arithmetic import make_problem
from hf_deepseek.evals.greedy import greedy_correct
from hf_deepseek.evals.task_data import load_rows

# (name, digits of both operands, lowest and highest a - b)
CLOSE_OPERANDS = [
    ("4 digits, a - b in 1..9", 4, 1, 9),
    ("4 digits, a - b in 10..99", 4, 10, 99),
    ("4 digits, a - b in 100..999", 4, 100, 999),
    ("4 digits, a - b in -9..-1", 4, -9, -1),
    ("3 digits, a - b in 1..9", 3, 1, 9),
]


def close_problems(digits: int, low: int, high: int, n: int, rng: random.Random) -> list[dict]:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rows = []
    while len(rows) < n:
        b = rng.randint(lo, hi)
        a = b + rng.randint(low, high)
        if lo <= a <= hi:
            rows.append(make_problem("sub", a, b))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--problems", type=int, default=50, help="close-operand problems per set")
    parser.add_argument("--turns", type=int, default=60, help="problems per conversation length")
    parser.add_argument("--max-earlier", type=int, default=4, help="most earlier exchanges before the question")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    result = {"command": "python " + " ".join(sys.argv), "close_operands": {}, "earlier_exchanges": {}}
    rng = random.Random(0)
    for name, digits, low, high in CLOSE_OPERANDS:
        rows = close_problems(digits, low, high, args.problems, rng)
        ok = greedy_correct(model, tokenizer, rows, "add_sub", len(rows), 384)
        wrong = [r["expression"] for r, good in zip(rows, ok, strict=True) if not good]
        result["close_operands"][name] = {"correct": sum(ok), "n": len(ok), "wrong": wrong}
        print(f"{name}: {sum(ok)}/{len(ok)}  e.g. wrong: {', '.join(wrong[:3])}", flush=True)
    splits = load_rows("add_sub")
    rows, context = splits["turns"][: args.turns], splits["context"]
    for depth in range(1, args.max_earlier + 1):
        earlier = [[context[(7 * i + 13 * k) % len(context)] for k in range(depth)] for i in range(len(rows))]
        ok = greedy_correct(model, tokenizer, rows, "add_sub", len(rows), 384, earlier)
        result["earlier_exchanges"][depth] = {"correct": sum(ok), "n": len(ok)}
        print(f"after {depth} earlier exchange(s): {sum(ok)}/{len(ok)}", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
