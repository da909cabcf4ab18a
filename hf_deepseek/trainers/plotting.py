"""Training curves: a callback that writes every log line to `metrics.jsonl` as it comes and, at the end of the run,
`metrics.csv` and PNG plots (loss, reward, accuracy, balance) drawn with matplotlib.
"""

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# figure name -> (title, metric keys or key prefixes ending in "/"); a figure is drawn if any of its keys was logged
FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss": ("Loss", ("loss", "mtp_loss", "aux_loss", "eval_loss")),
    "reward": ("Reward", ("reward", "reward_std", "rewards/")),
    "accuracy": ("Accuracy", ("mean_token_accuracy", "eval_mean_token_accuracy", "rewards/accuracy_reward/mean")),
    "balance": ("Expert balance", ("balance/max_violation", "balance/load_entropy", "balance/layer_")),
    "completions": ("Completion length", ("completions/mean_length", "completions/clipped_ratio")),
}
_SUMMARY_KEYS = ("train_runtime", "train_loss", "total_flos")


def _training_rows(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in log_history if "step" in row and not any(k in row for k in _SUMMARY_KEYS)]


def write_metrics_csv(log_history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per log line, one column per metric ever logged (blank where a line lacks it)."""
    rows = _training_rows(log_history)
    columns = ["step", *sorted({key for row in rows for key in row} - {"step"})]
    path = Path(path)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith("/") or p.endswith("_") else key == p for p in patterns)


def plot_metrics(log_history: Sequence[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Write one PNG per figure of `FIGURES` whose metrics appear in `log_history`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _training_rows(log_history)
    keys = sorted({k for row in rows for k, v in row.items() if isinstance(v, int | float) and k != "step"})
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, patterns) in FIGURES.items():
        series = [k for k in keys if _matches(k, patterns) and not k.endswith("/std")]
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        for key in series:
            points = [(row["step"], row[key]) for row in rows if key in row]
            layer_line = "/layer_" in key
            axes.plot(*zip(*points, strict=True), label=key, linewidth=0.8 if layer_line else 1.6, marker=".")
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        # beside the axes, so that no legend covers a curve
        axes.legend(fontsize=6 if len(series) > 6 else 8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        figure.tight_layout()
        path = output_dir / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


class MetricsPlotCallback(TrainerCallback):
    """Appends each log line to `<output_dir>/metrics.jsonl`; at the end writes `metrics.csv` and `plots/*.png`.
    Only the main process writes."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / "metrics.jsonl").open("a") as out:
                out.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_metrics_csv(state.log_history, self.output_dir / "metrics.csv")
            plot_metrics(state.log_history, self.output_dir / "plots")


_SFT_CURVES = (("loss", "loss (main + MTP)"), ("mtp_loss", "MTP loss"), ("mean_token_accuracy", "next-token accuracy"))
_GRPO_CURVES = (
    ("reward", "total reward"),
    ("rewards/accuracy_reward/mean", "accuracy reward"),
    ("rewards/format_reward/mean", "format reward"),
    ("rewards/opened_format_reward/mean", "format reward"),
)
_LENGTH_KEY = "completions/mean_length"  # on its own axis, right of the GRPO panel


def plot_stage_curves(
    stages: Sequence[tuple[str, str, Sequence[dict[str, Any]]]], path: str | Path, title: str | None = None
) -> Path:
    """One PNG of a whole recipe: every SFT stage's loss and token accuracy end to end on the left, GRPO rewards
    and the mean response length (right-hand axis) on the right (a running mean over ~1/20 of the run on top of the
    raw points); legends sit below the panels, clear of the curves. `stages` holds (name, "sft" or "grpo", log
    history) in run order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [(kind, curves) for kind, curves in (("sft", _SFT_CURVES), ("grpo", _GRPO_CURVES))
             if any(trainer == kind for _, trainer, _ in stages)] or [("sft", _SFT_CURVES)]  # fmt: skip
    figure, panels = plt.subplots(1, len(kinds), figsize=(11 if len(kinds) == 2 else 6, 4.6), squeeze=False)
    for panel, (kind, curves) in zip(panels[0], kinds, strict=True):
        handles = []
        runs, offset = [], 0  # stages of this kind, each shifted to start where the one before ended
        for name, trainer, history in stages:
            if trainer == kind:
                rows = _training_rows(history)
                runs.append((name, offset, rows))
                offset += max((row["step"] for row in rows), default=0)
        for name, start, _ in runs[1:]:
            panel.axvline(start, color="grey", linestyle=":", linewidth=1)
            panel.annotate(f" {name}", (start, 0.98), xycoords=("data", "axes fraction"), fontsize=7, va="top")
        length_axis = panel.twinx() if kind == "grpo" else None
        for color, (key, label) in enumerate([*curves, *([(_LENGTH_KEY, "mean response length (tokens, right)")]
                                                         if length_axis else [])]):  # fmt: skip
            axis = length_axis if key == _LENGTH_KEY else panel
            points = [(start + row["step"], row[key]) for _, start, rows in runs for row in rows if key in row]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            window = max(1, len(values) // 20) if kind == "grpo" else 1
            if window > 1:  # rewards of a few dozen samples a step are noisy: raw points faint, running mean bold
                axis.plot(steps, values, color=f"C{color}", alpha=0.25, linewidth=0.8)
                values = [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]
            style = "--" if key == _LENGTH_KEY else "-"
            marker = "." if len(values) < 60 else None
            handles += axis.plot(steps, values, style, color=f"C{color}", label=label, marker=marker)
        if length_axis is not None:
            length_axis.set_ylabel("tokens")
        what = "cold-start SFT" if kind == "sft" else "GRPO (rule-based rewards)"
        if runs and all(name == "pretrain" for name, _, _ in runs):  # R1-Zero's base: trained by the SFT trainer
            what = "pretraining (plain text)"
        panel.set_title(f"{what}: {' + '.join(name for name, _, _ in runs)}" if len(runs) > 1 else what)
        panel.set_xlabel("optimizer step")
        panel.grid(alpha=0.3)
        if handles:
            panel.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
