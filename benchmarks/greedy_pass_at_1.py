"""Greedy pass@1 on 500 sums, for the figures in checkpoints/hf-deepseek-r1-tiny/README.md:

    python benchmarks/greedy_pass_at_1.py --split test CHECKPOINT [CHECKPOINT ...]
    python benchmarks/greedy_pass_at_1.py --split validation CHECKPOINT [CHECKPOINT ...]

`test`: the first 500 rows of lm-eval's held-out `addition` task; `validation`: 500 sums from the training side of
the split (`task_examples("addition", 500, seed=77)`), for choosing between runs without looking at the test set.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.data.reasoning_tasks import task_examples
from hf_deepseek.evals.greedy import greedy_pass_at_1
from hf_deepseek.evals.task_data import load_rows

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("checkpoints", nargs="+")
parser.add_argument("--split", choices=["test", "validation"], default="test")
args = parser.parse_args()
torch.set_num_threads(1)
rows = load_rows("addition")["test"][:500] if args.split == "test" else list(task_examples("addition", 500, 77))
for path in args.checkpoints:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    print(f"{path}: {args.split} greedy pass@1 {greedy_pass_at_1(model, tokenizer, rows):.3f}")
