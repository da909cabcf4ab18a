"""Redraw a recipe's stage curves (`hf_deepseek.trainers.plotting.plot_stage_curves`) from the `metrics.csv` files its
stages wrote, e.g. for runs whose folders stayed on another machine:

    python benchmarks/plot_curves.py OUT.png "TITLE" sft:STAGE_A/metrics.csv grpo:STAGE_B/metrics.csv ...
"""

import csv
import sys
from pathlib import Path

from hf_deepseek.trainers.plotting import plot_stage_curves


def history(path: str) -> list[dict]:
    rows = []
    with open(path) as lines:
        for row in csv.DictReader(lines):
            rows.append({k: float(v) if k != "step" else int(float(v)) for k, v in row.items() if v not in ("", None)})
    return rows


if __name__ == "__main__":
    out, title, *specs = sys.argv[1:]
    stages = []
    for spec in specs:
        kind, path = spec.split(":", 1)
        stages.append((Path(path).parent.name or kind, kind, history(path)))
    print(plot_stage_curves(stages, out, title=title or None))
