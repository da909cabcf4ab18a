"""The SFT checkpoint to start GRPO from when GRPO must show what it adds: of the checkpoints a cold start saved, the
one whose greedy pass@1 on the hardest bucket is nearest a target (a model already at 99% leaves GRPO nothing to
show with non-overlapping intervals; one near 0% gives it nothing to select). With several buckets a checkpoint's
score is its lowest (mid-run checkpoints have been weakest on 4-digit sums, final ones on differences). Prints the
chosen directory.

    python benchmarks/pick_ancestor.py RUN_DIR [--target 0.88] [--bucket sub4[,add4]] [--limit 300] [--last 6]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.evals.greedy import greedy_correct
from hf_deepseek.evals.task_data import load_rows


def candidates(run_dir: Path, last: int) -> list[Path]:
    """The run's last `last` checkpoint-N folders by step, then the run's final model."""
    saved = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-last:]
    return saved + ([run_dir] if (run_dir / "config.json").is_file() else [])


def pick(scores: dict[str, float], target: float, floor: float) -> str:
    """Nearest the target among those at or above `floor`; if none is, the best one."""
    eligible = {path: acc for path, acc in scores.items() if acc >= floor}
    if not eligible:
        return max(scores, key=scores.get)
    return min(eligible, key=lambda path: abs(eligible[path] - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--target", type=float, default=0.88)
    parser.add_argument("--floor", type=float, default=0.75, help="lowest pass@1 worth starting GRPO from")
    parser.add_argument("--bucket", default="sub4", help="one bucket, or several: comma-separated")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--last", type=int, default=6, help="how many of the latest checkpoints to consider")
    parser.add_argument("--json", help="write every candidate's pass@1 here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    test = load_rows("add_sub")["test"]
    buckets = args.bucket.split(",")
    sets = {b: [r for r in test if r["bucket"] == b][: args.limit] for b in buckets}
    scores, every = {}, {}
    for path in candidates(args.run_dir, args.last):
        model = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        for bucket, rows in sets.items():
            ok = greedy_correct(model, tokenizer, rows, "add_sub", len(rows), 384)
            every.setdefault(str(path), {})[bucket] = sum(ok) / len(ok)
            print(f"{path}: {bucket} {sum(ok)}/{len(ok)}", file=sys.stderr, flush=True)
        scores[str(path)] = min(every[str(path)].values())
    if not scores:
        sys.exit(f"no checkpoint in {args.run_dir}")
    if args.json:
        summary = {"buckets": buckets, "n": args.limit, "pass@1": scores, "per_bucket": every}
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(pick(scores, args.target, args.floor))


if __name__ == "__main__":
    main()
