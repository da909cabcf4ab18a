"""Train one ~100M-parameter DeepSeek MoE from the same seed on the same batches in BF16 (autocast, FP32 master
weights) and with `convert_to_fp8_training` under each named FP8 recipe ("deepseek": 1x128 / 128x128 blockwise
scales, the paper's; "rowwise": one scale per row, torchtitan's), and compare the curves.

    python benchmarks/fp8_train_compare.py --steps 200 --recipes deepseek,rowwise --json curves.json --plot curves.png

The data are the bytes of the Python standard library's source (a byte-level vocabulary of 256), read in sorted
order, so both runs see exactly the same token stream without any download. The relative loss difference is taken
over the mean of the last `--tail` steps, where each step's loss is the main next-token cross-entropy.
"""

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training

CONFIG = dict(
    vocab_size=256, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=6,
    first_k_dense_replace=1, num_attention_heads=6, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
    n_shared_experts=1, num_nextn_predict_layers=1, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
    pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
)  # fmt: skip


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


def train(recipe: str | None, data: list[torch.Tensor], args, max_seconds: float = float("inf")) -> dict:
    """Stops early (and the caller trims the other run to match) once `max_seconds` have passed."""
    torch.manual_seed(args.seed)
    config = DeepSeekConfig(**CONFIG, attn_implementation="sdpa")
    model = DeepSeekForCausalLM(config).cuda().train()
    params = sum(p.numel() for p in model.parameters())
    if recipe:
        convert_to_fp8_training(model, FP8Recipe.named(recipe))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=True,
    )  # fmt: skip
    losses, start = [], time.time()
    for step, ids in enumerate(data):
        ids = ids.cuda(non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # aux-loss-free balancing: move each router's bias against its load
            for router in model.routers():
                load = router.last_expert_load.float()
                router.e_score_correction_bias += args.bias_rate * torch.sign(load.mean() - load)
        main = out.loss.detach() - config.mtp_loss_weight * out.mtp_loss.detach()
        losses.append(main)
        if step % 50 == 0 or step == len(data) - 1:
            print(f"{recipe or 'bf16'} step {step:4d} loss {main.item():.4f} {time.time() - start:6.1f}s")
        if time.time() - start > max_seconds:
            print(f"stopping after {step + 1} steps ({max_seconds:.0f} s budget)")
            break
    torch.cuda.synchronize()
    seconds = time.time() - start
    return {"loss": torch.stack(losses).tolist(), "seconds": seconds, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--recipes", default="deepseek,rowwise", help="comma-separated named FP8 recipes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--bias-rate", type=float, default=1e-3)
    parser.add_argument("--tail", type=int, default=50, help="steps averaged for the final loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="time budget of the bf16 run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()

    data = batches(stdlib_bytes(32 << 20), args.steps, args.batch, args.seq, seed=args.seed)
    bf16 = train(None, data, args, args.max_seconds)
    runs = {"bf16": bf16}
    for recipe in args.recipes.split(","):
        runs[f"fp8-{recipe}"] = train(recipe, data[: len(bf16["loss"])], args)
    final = {name: sum(r["loss"][-args.tail :]) / args.tail for name, r in runs.items()}
    mean = {name: sum(r["loss"]) / len(r["loss"]) for name, r in runs.items()}
    summary = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "params": runs["bf16"]["params"],
        "steps": len(runs["bf16"]["loss"]), "tokens_per_step": args.batch * args.seq, "final_mean_loss": final,
        "mean_loss": mean,
        "relative_difference_final": {n: (final[n] - final["bf16"]) / final["bf16"] for n in runs if n != "bf16"},
        "relative_difference_mean": {n: (mean[n] - mean["bf16"]) / mean["bf16"] for n in runs if n != "bf16"},
        "seconds": {n: r["seconds"] for n, r in runs.items()},
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "curves": {n: r["loss"] for n, r in runs.items()}}))
    if args.plot:
        plot(runs, summary, args)


def plot(runs: dict, summary: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name, run in runs.items():
        top.plot(run["loss"], label=f"{name} (last {args.tail}: {summary['final_mean_loss'][name]:.4f})", lw=1)
    top.set_ylabel("next-byte cross-entropy")
    top.set_yscale("log")
    top.legend(loc="upper right", framealpha=0.9)
    top.set_title(f"{summary['params'] / 1e6:.0f}M-param DeepSeek MoE, {summary['device']}: FP8 vs BF16")
    for name, run in runs.items():
        if name != "bf16":
            diff = [(f - b) / b * 100 for f, b in zip(run["loss"], runs["bf16"]["loss"], strict=True)]
            bottom.plot(diff, lw=0.8, label=name)
    bottom.axhline(0, color="black", lw=0.5)
    bottom.legend(loc="lower right", fontsize="small")
    bottom.set_ylabel("(fp8 - bf16) / bf16, %")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
