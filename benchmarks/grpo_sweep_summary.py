"""Summary of one issue-7 GRPO sweep: python benchmarks/grpo_sweep_summary.py ROOT OUT_DIR

ROOT holds configs.tsv (name<TAB>overrides), ancestor_eval.txt, and per run NAME/ (steps.json, metrics.jsonl,
checkpoints) and NAME.eval.txt (lines `PATH: validation greedy pass@1 X` of benchmarks/greedy_pass_at_1.py).
Run by benchmarks/grpo_sweep.sh at its end. Writes OUT_DIR/grpo_sweep.md and .json (also as ROOT/summary.json),
and ROOT/WINNER (the best evaluated directory) with a `best` link to it.
"""

import json
import os
import re
import statistics
import sys
from pathlib import Path

EVAL_LINE = re.compile(r"^(.*): validation greedy pass@1 ([0-9.]+)$")


def read_evals(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        m = EVAL_LINE.match(line.strip())
        if m:
            out[m[1]] = float(m[2])
    return out


def metric_series(run: Path, key: str) -> list[float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    values = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in row and "train_runtime" not in row:
            values.append(float(row[key]))
    return values


def mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def step_of(path: str) -> int | None:
    m = re.search(r"checkpoint-(\d+)$", path.rstrip("/"))
    return int(m[1]) if m else None


def main(root: Path, out: Path) -> None:
    configs = [line.split("\t", 1) for line in (root / "configs.tsv").read_text().splitlines() if line.strip()]
    ancestor = read_evals(root / "ancestor_eval.txt")
    ancestor_value = next(iter(ancestor.values()), None)
    runs, best = [], None
    for name, overrides in configs:
        run = root / name
        steps = {}
        if (run / "steps.json").is_file():
            steps = json.loads((run / "steps.json").read_text())
        times = steps.get("steps", [])
        durations = [b[1] - a[1] for a, b in zip(times, times[1:], strict=False)]
        steady = durations[2:] or durations
        acc = metric_series(run, "rewards/accuracy_reward/mean")
        col = metric_series(run, "rewards/column_reward/mean")
        kl, entropy = metric_series(run, "kl"), metric_series(run, "entropy")
        evals = read_evals(root / f"{name}.eval.txt")
        points = []
        for path, value in evals.items():
            step = step_of(path)
            final = step is None
            points.append(
                {"path": path, "step": steps.get("global_step", len(times)) if final else step, "final": final,
                 "val_pass_at_1": value}
            )  # fmt: skip
        points.sort(key=lambda p: (p["step"] or 0, p["final"]))
        for p in points:
            if (
                best is None
                or p["val_pass_at_1"] > best["val_pass_at_1"]
                or (p["val_pass_at_1"] == best["val_pass_at_1"] and p["final"] and best["config"] == name)
            ):
                best = {**p, "config": name}
        final = next((p for p in points if p["final"]), points[-1] if points else None)
        runs.append(
            {
                "config": name,
                "overrides": overrides,
                "steps_done": steps.get("global_step", times[-1][0] if times else 0),
                "stopped_by_wall": steps.get("stopped_by_wall", False),
                "generation": steps.get("generation"),
                "t_train_begin_s": steps.get("t_train_begin"),
                "t_first_step_s": times[0][1] if times else None,
                "t_saved_s": steps.get("t_saved"),
                "s_per_step_median": round(statistics.median(steady), 3) if steady else None,
                "acc_reward_first10": mean(acc[:10]),
                "acc_reward_last10": mean(acc[-10:]),
                "column_reward_first10": mean(col[:10]),
                "column_reward_last10": mean(col[-10:]),
                "kl_last10": mean(kl[-10:]),
                "entropy_first10": mean(entropy[:10]),
                "entropy_last10": mean(entropy[-10:]),
                "val": points,
                "val_final": final["val_pass_at_1"] if final else None,
                "adam_stats": steps.get("stats", {}),
            }
        )
    if best is not None:
        (root / "WINNER").write_text(best["path"] + "\n")
        link = root / "best"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(best["path"], root))
    summary = {"root": str(root), "ancestor_val_pass_at_1": ancestor_value, "winner": best, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_sweep.json").write_text(json.dumps(summary, indent=1))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v, f="{:.3f}"):
        return "-" if v is None else f.format(v)

    lines = [
        f"# GRPO sweep: {root}",
        "",
        f"SFT-only ancestor `checkpoints/hf-deepseek-r1-tiny-sft`, validation greedy pass@1 (same run, same script): "
        f"**{pct(ancestor_value)}**",
        "",
        "| config | steps | s/step | 1st step at (s) | gen | acc reward first10 -> last10 | column first10 -> last10 "
        "| val pass@1 (step: value) | final val |",
        "|---|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in runs:
        vals = ", ".join(f"{p['step']}{'f' if p['final'] else ''}: {pct(p['val_pass_at_1'])}" for p in r["val"])
        gen = (r["generation"] or "-").split(" ")[0]
        lines.append(
            f"| {r['config']} | {r['steps_done']} | {num(r['s_per_step_median'], '{:.2f}')} | "
            f"{num(r['t_first_step_s'], '{:.0f}')} | {gen} | {num(r['acc_reward_first10'])} -> "
            f"{num(r['acc_reward_last10'])} | {num(r['column_reward_first10'])} -> {num(r['column_reward_last10'])} | "
            f"{vals or '-'} | {pct(r['val_final'])} |"
        )
    lines += ["", "Overrides of each config (on top of `hf-deepseek train grpo --recipe r1_tiny`):", ""]
    lines += [f"- `{r['config']}`: `{r['overrides']}`" for r in runs]
    winner_line = "no run was evaluated"
    if best:
        winner_line = (
            f"Winner (highest validation pass@1 of every evaluated directory; chosen on these 500 sums, so "
            f"optimistic): `{best['path']}` ({best['config']}, step {best['step']}, {pct(best['val_pass_at_1'])}); "
            f"also `{root}/best` and `{root}/WINNER` on the device."
        )
    lines += ["", winner_line]
    lines += ["", "Adam statistics at a few steps (|g| after clipping and sqrt(v_hat): p10/p50/p90/p99; share of "
              "weights with sqrt(v_hat) below 1e-6/1e-5/1e-4, both among the weights that had a gradient; share "
              "that never had one):", ""]  # fmt: skip
    for r in runs:
        for step, st in sorted(r["adam_stats"].items(), key=lambda kv: int(kv[0])):
            g = "/".join(f"{v:.1e}" for v in st.get("abs_grad_p10_50_90_99", []))
            v = "/".join(f"{x:.1e}" for x in st.get("sqrt_vhat_p10_50_90_99", []))
            share = "/".join(f"{x:.2f}" for x in st.get("share_sqrt_vhat_below", {}).values())
            never = st.get("share_never_touched")
            never = "-" if never is None else f"{never:.2f}"
            lines.append(f"- {r['config']} step {step}: |g| {g}; sqrt(v_hat) {v}; below {share}; never {never}")
    (out / "grpo_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 7 + len(runs)]))
    print(winner_line)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
