"""Greedy pass@1 per bucket of the `add_sub` evaluation set (1- to 4-digit addition and subtraction), and on its
`turns` problems asked first and as the second turn of a conversation, with Wilson 95% intervals; the same problems
and prompts as the lm-eval tasks `hfds_add_sub_*` (`hf_deepseek/evals/tasks/add_sub_*.yaml`), without lm-eval:

    python benchmarks/add_sub_eval.py CHECKPOINT [CHECKPOINT ...] [--json results.json] [--device cuda] [--large]

`--large` adds the hardest buckets' 2,000-problem sets (`add4_2k`, `sub4_2k`: the bucket's 500 and 1,500 more held-out
problems; lm-eval tasks `hfds_add_sub_add4_2k`, `hfds_add_sub_sub4_2k`); `--sets` may name them too.
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.data.column_arithmetic import BUCKETS
from hf_deepseek.demo import wilson_interval
from hf_deepseek.evals.greedy import greedy_correct
from hf_deepseek.evals.task_data import ADD_SUB_LARGE, add_sub_set, load_rows

LARGE_SETS = tuple(f"{bucket}_2k" for bucket in ADD_SUB_LARGE)


def evaluate(
    path: str, device: str, batch_size: int, limit: int | None = None, sets_wanted=None, large: bool = False
) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_rows("add_sub")
    sets = {bucket: (add_sub_set(splits, bucket), None) for bucket in BUCKETS}
    turns = splits["turns"]
    sets["turn1"] = (turns, None)
    sets["turn2"] = (turns, splits["context"][: len(turns)])
    for name in LARGE_SETS:
        sets[name] = (add_sub_set(splits, name), None)
    results = {}
    for name, (rows, earlier) in sets.items():
        if (sets_wanted and name not in sets_wanted) or (not sets_wanted and name in LARGE_SETS and not large):
            continue
        rows, earlier = rows[:limit], earlier[:limit] if earlier else None
        ok = greedy_correct(model, tokenizer, rows, "add_sub", batch_size, 384, earlier)
        low, high = wilson_interval(sum(ok), len(ok))
        results[name] = {"correct": sum(ok), "n": len(ok), "pass@1": sum(ok) / len(ok), "interval": [low, high]}
        print(f"{path} {name}: {sum(ok)}/{len(ok)} = {sum(ok) / len(ok):.3f} [{low:.3f}, {high:.3f}]", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--limit", type=int, help="the first N problems of each set (quick checks)")
    also = ", ".join(LARGE_SETS)
    parser.add_argument("--sets", help=f"comma-separated sets (default add1..sub4, turn1, turn2; also {also})")
    parser.add_argument("--large", action="store_true", help=f"also the 2,000-problem sets {also}")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    everything = {
        path: evaluate(path, args.device, args.batch_size, args.limit, args.sets and args.sets.split(","), args.large)
        for path in args.checkpoints
    }
    if args.json:
        with open(args.json, "w") as out:
            json.dump(everything, out, indent=1)
