"""Summary of `benchmarks/train_h200.sh`'s results: our training-step variants against bf16 and against
torchtitan's in the same call (speed, MFU, peak memory, mean loss and each step's loss), and the 200-step FP8 vs bf16
comparison on real text. Reads `bench_train.json`, `titan_anchor.json`, `fp8_train_compare.json` and, when present,
`bench_train_v3_width.json` from the folder given; prints what it finds and notes what is missing.

    python benchmarks/train_h200_summary.py $OUT
"""

import json
import sys
from pathlib import Path

BF16, BF16_UNFUSED = "hf_deepseek-bf16", "hf_deepseek-bf16-unfused-loss"
ISSUE_TARGETS = (
    "targets: FP8 step >= 1.15x bf16; bf16 >= 65% MFU (<= 188 ms) at peak memory <= torchtitan bf16's; "
    "FP8 mean loss within 0.25% of bf16's"
)


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"{name}: missing or unreadable ({type(error).__name__})")
        return None


def fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def main(folder: Path) -> None:
    bench, titan, compare = (
        load(folder, n) for n in ("bench_train.json", "titan_anchor.json", "fp8_train_compare.json")
    )
    rows = [r for r in (bench or {}).get("variants", [])] + [r for r in (titan or {}).get("variants", [])]
    by_name = {r["name"]: r for r in rows if r.get("step_ms")}
    print(ISSUE_TARGETS)
    print("| variant | step ms | MFU | peak GiB | mean loss | loss vs its bf16 | speed vs its bf16 | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        loss_rel = speed = None
        base = by_name.get(BF16 if r["name"].startswith("hf_deepseek") else "titan-bf16")  # each from its own init
        if base and r.get("mean_loss"):
            loss_rel = 100 * (r["mean_loss"] / base["mean_loss"] - 1)
            speed = base["step_ms"] / r["step_ms"] if r.get("step_ms") else None
        print(
            f"| {r['name']} | {fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('mfu'), '.1%')} | "
            f"{fmt(r.get('peak_memory_gib'), '.2f')} | {fmt(r.get('mean_loss'), '.4f')} | "
            f"{fmt(loss_rel, '+.2f', '%')} | {fmt(speed, '.3f', 'x')} | {(r.get('note') or '')[:100]} |"
        )
    fastest_bf16 = min((by_name[n]["step_ms"] for n in (BF16, BF16_UNFUSED) if n in by_name), default=None)
    for name, r in by_name.items():
        if "fp8" in name and fastest_bf16 and name.startswith("hf_deepseek"):
            print(f"{name}: {fastest_bf16 / r['step_ms']:.3f}x the faster bf16 step ({fastest_bf16:.1f} ms)")
    for key, value in (bench or {}).get("ratios", {}).items():  # captured steps against plain, FP8 against bf16
        if "-cuda-graph" in key:
            print(f"{key}: {value:+.3%}" if "mean loss" in key else f"{key}: {value:.3f}x")
    for ours in [n for n in by_name if n.startswith("hf_deepseek")]:
        for theirs in [n for n in by_name if n.startswith("titan")]:
            print(f"{ours} / {theirs} speed: {by_name[theirs]['step_ms'] / by_name[ours]['step_ms']:.3f}x")
    print("\nlosses step by step (the bench's two alternating batches):")
    for r in rows:
        if r.get("losses"):
            print(f"  {r['name'][:32]:<32} " + " ".join(f"{x:6.3f}" for x in r["losses"]))
    v3 = (folder / "bench_train_v3_width.json").is_file() and load(folder, "bench_train_v3_width.json")
    if v3:
        v3_rows = {r["name"]: r for r in v3.get("variants", []) if r.get("step_ms")}
        print("\nV3-width shape (target: FP8 >= 1.4x bf16):")
        for name, r in v3_rows.items():
            speed = v3_rows[BF16]["step_ms"] / r["step_ms"] if BF16 in v3_rows else None
            print(
                f"  {name}: {r['step_ms']:.1f} ms, MFU {fmt(r.get('mfu'), '.1%')}, "
                f"peak {fmt(r.get('peak_memory_gib'), '.2f')} GiB, "
                f"mean loss {fmt(r.get('mean_loss'), '.4f')}, {fmt(speed, '.3f', 'x')} bf16"
            )
    if compare:
        print(
            f"\nfp8_train_compare ({compare.get('shape')}, {compare.get('params', 0) / 1e6:.0f}M parameters, "
            f"{compare.get('steps')} of {compare.get('requested_steps')} steps, "
            f"{compare.get('tokens_per_step')} tokens a step, seconds {compare.get('seconds')}):"
        )
        for name, value in compare.get("mean_loss_difference_percent", {}).items():
            print(f"  {name}: mean loss {value:+.3f}% against bf16")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
