"""Train one DeepSeek MoE from the same seed on the same batches in BF16 (autocast, FP32 master weights) and with
`convert_to_fp8_training` under each named FP8 recipe ("deepseek": 1x128 / 128x128 blockwise scales, the paper's;
"rowwise": one scale per row, torchtitan's), and compare the curves.

    python benchmarks/fp8_train_compare.py --steps 200 --recipes deepseek,rowwise --json curves.json --plot curves.png
    python benchmarks/fp8_train_compare.py --recipes rowwise,rowwise+linear_wgrad=bf16 ...    # a recipe's field
    python benchmarks/fp8_train_compare.py --shape bench --steps 200 --max-seconds 40 ...  # the bench's layers
    python benchmarks/fp8_train_compare.py --shape tiny --device cpu --steps 8                # CPU smoke test
    python benchmarks/fp8_train_compare.py --shape bench --seeds 0,1,2 ...   # pooled over three seeds

Shapes (`--shape`): "small" (135M parameters: 6 layers, hidden 768, 16 experts top-4, 1 MTP layer; 16 x 512 tokens
a step), "bench" (`hf-deepseek bench train`'s layers: hidden 2048, MLA 1536 / 512, 16 heads, 64 experts of width 1408
top-6 in 8 groups + 2 shared, the first layer dense; 4 layers rather than 8 and no MTP layer, 1.84B parameters;
8 x 1024 tokens a step), "tiny" (a CPU smoke test). The data are the bytes of the Python standard library's source
(a byte-level vocabulary of 256), read in sorted order, so every run sees exactly the same token stream without
any download. Each step's loss is the main next-token cross-entropy; the runs are compared by the mean over all
steps (`mean_loss_difference_percent`, the issue's criterion) and over the last `--tail` steps. `--max-seconds`
caps each run's time after its first step (which compiles, with `--compile`, and is not counted); all runs are then
cut to the steps every one of them completed.

One run per precision is a noisy measure: routing is discrete, so a perturbation of one rounding sends two runs
down different paths, and on an H100 two bf16 runs of the same seed, whose code differed only in how the LM head's
gradient was rounded, differed by 1.5% in mean loss over 200 steps (docs/PERF.md, 2026-12-06). `--seeds` repeats
the comparison from several initialisations and batch orders: the difference is pooled over them
(`mean_loss_difference_percent`), each seed's kept (`..._per_seed`) with their spread.
"""

import argparse
import json
import math
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.modeling.compile_regions import compile_for_training
from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training
from hf_deepseek.trainers.recipes import parse_value

SMALL = dict(
    vocab_size=256, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=6,
    first_k_dense_replace=1, num_attention_heads=6, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
    n_shared_experts=1, num_nextn_predict_layers=1, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
    pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
)  # fmt: skip
BENCH = SMALL | dict(
    hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=4, num_attention_heads=16,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=2,
    num_nextn_predict_layers=0, max_position_embeddings=2048,
)  # fmt: skip
TINY = SMALL | dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
    num_experts_per_tok=2,
)  # fmt: skip
# shape -> (config, batch, sequence length, peak learning rate)
SHAPES = {"small": (SMALL, 16, 512, 1.5e-3), "bench": (BENCH, 8, 1024, 6e-4), "tiny": (TINY, 2, 64, 1.5e-3)}


def stdlib_bytes(limit: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if size >= limit:
            break
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=gen)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def recipe_from_spec(spec: str) -> FP8Recipe:
    """A named recipe with `+field=value` overrides, e.g. `rowwise+linear_wgrad=bf16`."""
    name, *overrides = spec.split("+")
    values = {key: parse_value(value) for key, value in (override.split("=", 1) for override in overrides)}
    # the recipes' value syntax; lists as tuples, since a recipe is frozen and hashed
    return FP8Recipe.named(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def train(recipe: str | None, data: list[torch.Tensor], args, seed: int, max_seconds: float = float("inf")) -> dict:
    """Stops early, once `max_seconds` have passed since the first step, which compiles and warms up and is not
    counted (the caller cuts every run to the steps all of them made)."""
    device = torch.device(args.device)
    torch.manual_seed(seed)
    config = DeepSeekConfig(**SHAPES[args.shape][0], attn_implementation="sdpa")
    with torch.device(device):  # initialised where it trains (the same weights for every run: same seed)
        model = DeepSeekForCausalLM(config).train()
    params = sum(p.numel() for p in model.parameters())
    if recipe:
        convert_to_fp8_training(model, recipe_from_spec(recipe))
    if args.compile:
        compile_for_training(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )  # fmt: skip
    losses, start, budget_start = [], time.time(), None
    for step, ids in enumerate(data):
        ids = ids.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # aux-loss-free balancing: move each router's bias against its load
            for router in model.routers():
                load = router.last_expert_load.float()
                router.e_score_correction_bias += args.bias_rate * torch.sign(load.mean() - load)
        main = out.loss.detach()
        if out.mtp_loss is not None:
            main = main - config.mtp_loss_weight * out.mtp_loss.detach()
        losses.append(main)
        if step % 50 == 0 or step == len(data) - 1:
            print(f"{recipe or 'bf16'} step {step:4d} loss {main.item():.4f} {time.time() - start:6.1f}s", flush=True)
        if budget_start is None:  # after the first step (its loss's print waited for it)
            budget_start = time.time()
        elif time.time() - budget_start > max_seconds:
            print(f"{recipe or 'bf16'}: stopping after {step + 1} steps ({max_seconds:.0f} s budget)", flush=True)
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - start
    return {"loss": torch.stack(losses).float().tolist(), "seconds": seconds, "params": params, "steps": len(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--recipes",
        default="deepseek,rowwise",
        help="comma-separated named FP8 recipes, each with +field=value overrides",
    )
    parser.add_argument("--batch", type=int, help="sequences a step (default: the shape's)")
    parser.add_argument("--seq", type=int, help="tokens a sequence (default: the shape's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the shape's)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--bias-rate", type=float, default=1e-3)
    parser.add_argument("--tail", type=int, default=50, help="steps averaged for the final loss")
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds (initial weights and batches): each seed trains bf16 and every recipe; the "
        "difference is pooled over them, and its spread across seeds says how much of it is run-to-run chaos",
    )
    parser.add_argument("--compile", action="store_true", help="compile each layer (compile_for_training)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=float("inf"),
        help="time budget of each run, from the end of its first step",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    _, batch, seq, lr = SHAPES[args.shape]
    args.batch, args.seq, args.lr = args.batch or batch, args.seq or seq, args.lr or lr

    seeds = [int(seed) for seed in args.seeds.split(",")]
    text = stdlib_bytes(32 << 20)
    by_seed = []  # {run name: run} a seed
    for seed in seeds:
        data = batches(text, args.steps, args.batch, args.seq, seed=seed)
        runs = {"bf16": train(None, data, args, seed, args.max_seconds)}
        for recipe in args.recipes.split(","):
            runs[f"fp8-{recipe}"] = train(recipe, data[: runs["bf16"]["steps"]], args, seed, args.max_seconds)
        by_seed.append(runs)
    steps = min(r["steps"] for runs in by_seed for r in runs.values())
    for runs in by_seed:
        for run in runs.values():
            run["loss"] = run["loss"][:steps]
    runs = by_seed[0]  # the curves plotted and kept under "curves"
    tail = min(args.tail, steps)
    # pooled over the seeds: the mean of every seed's mean (tail) loss
    final = {n: statistics.fmean(sum(s[n]["loss"][-tail:]) / tail for s in by_seed) for n in runs}
    mean = {n: statistics.fmean(sum(s[n]["loss"]) / steps for s in by_seed) for n in runs}
    percent = {n: 100 * (mean[n] - mean["bf16"]) / mean["bf16"] for n in runs if n != "bf16"}
    per_seed = {
        n: [100 * (sum(s[n]["loss"]) - sum(s["bf16"]["loss"])) / sum(s["bf16"]["loss"]) for s in by_seed]
        for n in percent
    }
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.device} ({platform.machine()})"
    summary = {
        "command": " ".join(["python", *sys.argv]), "device": device, "torch": torch.__version__,
        "shape": args.shape, "params": runs["bf16"]["params"], "steps": steps, "requested_steps": args.steps,
        "tokens_per_step": args.batch * args.seq, "lr": args.lr, "compiled": args.compile,
        "final_mean_loss": final, "mean_loss": mean, "mean_loss_difference_percent": percent,
        "relative_difference_final": {n: (final[n] - final["bf16"]) / final["bf16"] for n in runs if n != "bf16"},
        "relative_difference_mean": {n: (mean[n] - mean["bf16"]) / mean["bf16"] for n in runs if n != "bf16"},
        "seeds": seeds, "mean_loss_difference_percent_per_seed": per_seed,
        "spread_across_seeds_percent": {n: statistics.stdev(v) if len(v) > 1 else None for n, v in per_seed.items()},
        "seconds": {n: sum(s[n]["seconds"] for s in by_seed) for n in runs},
        "steps_done": {n: min(s[n]["steps"] for s in by_seed) for n in runs},
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    for name, value in percent.items():
        seeds_note = f"; per seed {', '.join(f'{v:+.3f}%' for v in per_seed[name])}" if len(seeds) > 1 else ""
        print(
            f"{name}: mean loss over {steps} steps {value:+.3f}% against bf16 ({mean[name]:.4f} vs {mean['bf16']:.4f})"
            + seeds_note
        )
    if args.json:
        curves = {n: r["loss"] for n, r in runs.items()}
        curves_by_seed = {str(seed): {n: r["loss"] for n, r in runs_of_seed.items()}
                          for seed, runs_of_seed in zip(seeds, by_seed, strict=True)}  # fmt: skip
        Path(args.json).write_text(json.dumps({**summary, "curves": curves, "curves_by_seed": curves_by_seed}))
    if args.plot:
        plot(by_seed, summary, args)


def plot(by_seed: list[dict], summary: dict, args) -> None:
    """The first seed's curves on top; below, each recipe's step-by-step difference to bf16, every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = {}
    runs, seeds = by_seed[0], summary["seeds"]
    pooled = f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    for name, run in runs.items():
        label = f"{name} (last {min(args.tail, summary['steps'])}{pooled}: {summary['final_mean_loss'][name]:.4f})"
        colors[name] = top.plot(run["loss"], label=label, lw=1)[0].get_color()
    for name, value in summary["mean_loss_difference_percent"].items():
        top.plot([], [], " ", label=f"{name}: mean over {summary['steps']} steps{pooled} {value:+.2f}%")
    top.set_ylabel("next-byte cross-entropy")
    top.set_yscale("log")
    top.legend(loc="upper right", framealpha=0.9)
    seeds_note = f"\n(curves: seed {seeds[0]}; differences: every seed)" if len(seeds) > 1 else ""
    title = f"FP8 vs BF16, {summary['params'] / 1e9:.2f}B-parameter DeepSeek MoE, {summary['device']}{seeds_note}"
    top.set_title(title, fontsize=10)
    for i, (seed, runs) in enumerate(zip(seeds, by_seed, strict=True)):
        for name, run in runs.items():
            if name != "bf16":
                diff = [(f - b) / b * 100 for f, b in zip(run["loss"], runs["bf16"]["loss"], strict=True)]
                label = name + (f", seed {seed}" if len(seeds) > 1 else "")
                bottom.plot(diff, lw=0.8, label=label, color=colors[name], alpha=1.0 if i == 0 else 0.45)
    bottom.axhline(0, color="black", lw=0.5)
    bottom.legend(loc="lower right", fontsize="small")
    bottom.set_ylabel("(fp8 - bf16) / bf16, %")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
