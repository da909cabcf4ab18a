"""The benchmark's outputs: a Markdown table (printed, and saved as `bench.md` for docs/PERF.md), `bench.json`,
and PNG charts (decode and prefill throughput by context, KV-cache bytes). Charts need matplotlib; without it the
table and JSON are still written, and `python -m hf_deepseek.evals.bench_report DIR` draws them later from DIR's
bench.json."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

CPU_NOTE = (
    "On a CPU these figures only show that the benchmark runs: speed ratios between the models mean nothing "
    "here (kernels, caches and threading differ from a GPU's); measure on a GPU to compare them."
)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Header lines (machine, shapes, cache sizes, MTP acceptance) and one row per (batch, context, model)."""
    kv = results["kv_cache_bytes_per_token_per_layer"]
    lines = [
        f"Machine: {results['machine']['device']}; torch {results['machine']['torch']}, "
        f"transformers {results['machine']['transformers']}; dtype {results['dtype']}; {results['checkpoint']}; "
        + ", ".join(f"{m['name']} {m['parameters'] / 1e6:,.1f}M parameters" for m in results["models"])
        + " (transformers drops the MTP layer).",
        "",
        "| KV cache, bytes per token per layer | value |",
        "|---|---:|",
    ]
    for model in results["models"]:
        lines.append(
            f"| {model['name']} (measured, {model['cache_dtype']}) | {model['cache_bytes_per_token_per_layer']:,.0f} |"
        )
    v3_latent, v3_mha = kv["deepseek_v3_671b_latent"], kv["deepseek_v3_671b_full_mha"]
    lines += [
        f"| full multi-head attention, same shapes | {kv['full_mha_equivalent']:,} |",
        f"| DeepSeek-V3 671B: MLA latent / full MHA | {v3_latent:,} / {v3_mha:,} ({v3_mha / v3_latent:.0f}x) |",
        "",
    ]
    for model in results["models"]:
        rate = model["mtp_acceptance"]
        if rate is None:
            lines.append(f"MTP speculative decoding, {model['name']}: n/a ({model['mtp_note']}).")
            continue
        lines.append(
            f"MTP speculative decoding, {model['name']} ({model['mtp_note']}): draft acceptance {rate:.1%} of "
            f"{model['mtp_drafts']} drafts, {model['mtp_tokens_per_pass']:.2f} tokens per main-model pass, "
            f"{model['speculative_tok_s']:.1f} tok/s against {model['greedy_tok_s']:.1f} tok/s for plain greedy "
            f"generate ({model['speculative_tok_s'] / model['greedy_tok_s']:.2f}x)."
        )
    for model in results["models"]:
        if model["weights_gib"] is not None:
            lines.append(f"Weights of {model['name']} on the device: {model['weights_gib']:.2f} GiB.")
    lines += [
        "",
        "| batch | context | model | prefill tok/s | decode tok/s | decode ms/step | peak GiB (with weights) "
        "| KV cache MiB | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    cells = sorted(
        (cell for model in results["models"] for cell in model["cells"]),
        key=lambda c: (c["batch"], c["context"]),
    )
    for c in cells:
        cache_mib = None if c["cache_bytes"] is None else c["cache_bytes"] / 2**20
        lines.append(
            f"| {c['batch']} | {c['context']} | {c['model']} | {_fmt(c['prefill_tok_s'], 0)} | "
            f"{_fmt(c['decode_tok_s'])} | {_fmt(c['decode_ms_per_step'])} | {_fmt(c['peak_memory_gib'], 2)} | "
            f"{_fmt(cache_mib, 3)} | {c['note']} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """decode.png and prefill.png (tokens/s against context, one line per model and batch size), kv_cache.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    batches = sorted({c["batch"] for model in results["models"] for c in model["cells"]})
    colors = {batch: f"C{i}" for i, batch in enumerate(batches)}
    for metric, title, filename in (
        ("decode_tok_s", "Decode throughput", "decode.png"),
        ("prefill_tok_s", "Prefill throughput", "prefill.png"),
    ):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, model in enumerate(results["models"]):
            for batch in batches:
                points = [(c["context"], c[metric]) for c in model["cells"] if c["batch"] == batch and c[metric]]
                if points:
                    xs, ys = zip(*points, strict=True)
                    style = "-o" if i == 0 else "--s"
                    ax.plot(xs, ys, style, color=colors[batch], label=f"{model['name']}, batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="tokens / s", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(
            fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0
        )  # beside, not over, the lines
        fig.tight_layout()
        fig.savefig(output_dir / filename, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(output_dir / filename)

    kv = results["kv_cache_bytes_per_token_per_layer"]
    labels = [f"{m['name']}\n(measured)" for m in results["models"]] + ["full MHA\n(same shapes)"]
    values = [m["cache_bytes_per_token_per_layer"] for m in results["models"]] + [kv["full_mha_equivalent"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(labels, values, color=["tab:blue", "tab:orange", "tab:gray"][: len(values)])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values])
    ax.set(ylabel="bytes per token per layer", title=f"KV cache ({results['dtype']})")
    fig.tight_layout()
    fig.savefig(output_dir / "kv_cache.png", dpi=120)
    plt.close(fig)
    paths.append(output_dir / "kv_cache.png")
    return paths


def write_report(
    results: dict[str, Any], output_dir: Path, progress: Callable[[str], None] = print, final: bool = True
) -> None:
    """Write bench.md and bench.json into `output_dir`; when `final`, also print the table and draw the charts.
    (The benchmark writes a partial report after each model, so a run cut short keeps what it measured.)"""
    table = markdown_table(results)
    if results["machine"]["device"].startswith("cpu"):
        table = f"{CPU_NOTE}\n\n{table}"
    command = results.get("command") or "(run from Python)"
    (output_dir / "bench.md").write_text(f"Command: `{command}`\n\n{table}\n")
    (output_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    if not final:
        return
    print(table, flush=True)
    try:
        paths = plot(results, output_dir)
    except ImportError:
        progress("matplotlib is not installed: no PNG charts (the table and bench.json are written)")
        return
    progress(f"wrote {output_dir / 'bench.json'}, {output_dir / 'bench.md'}, " + ", ".join(p.name for p in paths))


if __name__ == "__main__":  # re-render a run's outputs, e.g. the charts of a run made where matplotlib is missing
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m hf_deepseek.evals.bench_report DIR   (DIR holds the bench.json of a run)")
    directory = Path(sys.argv[1])
    write_report(json.loads((directory / "bench.json").read_text()), directory)
