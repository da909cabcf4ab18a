"""`hf-deepseek bench train --num-processes N`: the expert-parallel training step (`parallel/training.py`: EP + FSDP2,
AdamW, clipping, router-bias update) on N processes against the same loop in one process, at the bench's shapes
with the batch scaled to the process count (each process keeps `batch_size` rows of `seq_len` tokens).

The model is built as `bench train` builds its `hf_deepseek-bf16` variant, uncompiled: bf16 weights on CUDA (fp32
on a CPU) and the chunked output loss. The command starts torchrun; in there rank 0 first trains alone (the plain
model, no parallelism: the one-GPU figure) while the others wait, then all N train expert-parallel. Reported: median
step time, tokens/s in all and per GPU, and the scaling (N-process tokens/s over one process's). Rank 0 writes
bench_train_parallel.json and .md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hf_deepseek.evals.bench_train import TrainBenchPlan, plan_from_args
from hf_deepseek.usage_errors import UsageError

PLAN_FILE, RESULT_FILE = "plan.json", "bench_train_parallel.json"


def timed_steps(trainer, rows: torch.Tensor, warmup: int, steps: int) -> dict[str, Any]:
    """Train `warmup + steps` steps; the median time of the last `steps` and every loss."""
    times, losses = [], []
    for step in range(warmup + steps):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        metrics = trainer.train_step(trainer.batch(rows, step))  # reads the loss and norm: the step has ended
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    step_s = statistics.median(times)
    tokens = trainer.options.per_device_train_batch_size * trainer.world * rows.shape[1]
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**30 if trainer.device.type == "cuda" else None
    return {
        "processes": trainer.world, "step_ms": 1000 * step_s, "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_gpu": tokens / step_s / trainer.world, "peak_memory_gib": peak, "losses": losses,
    }  # fmt: skip


def bench_model(config, device: torch.device):
    """The model from seed 0 on the CPU (the trainer splits the experts before moving it): bf16 weights for CUDA,
    fp32 for a CPU, the chunked output loss."""
    from hf_deepseek import DeepSeekForCausalLM
    from hf_deepseek.modeling.output_loss import enable_fused_output_loss

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = DeepSeekForCausalLM._from_config(config, dtype=dtype)
    enable_fused_output_loss(model)
    return model


def run_worker(output_dir: str) -> None:
    """Inside torchrun: the one-process figure on rank 0, then the N-process one; rank 0 writes the results."""
    import torch.distributed as dist

    from hf_deepseek import DeepSeekConfig
    from hf_deepseek.parallel.training import ExpertParallelTrainer, ParallelTrainOptions, distributed_mesh

    out = Path(output_dir)
    saved = json.loads((out / PLAN_FILE).read_text())
    plan, command = TrainBenchPlan(**saved["plan"]), saved["command"]
    mesh, device = distributed_mesh()
    world, rank = dist.get_world_size(), dist.get_rank()
    config = DeepSeekConfig(**plan.config)
    total = plan.warmup_steps + plan.steps
    rows = torch.randint(0, config.vocab_size, (total * plan.batch_size * world, plan.seq_len),
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    options = ParallelTrainOptions(
        output_dir=str(out), max_steps=total, per_device_train_batch_size=plan.batch_size, max_length=plan.seq_len,
        learning_rate=plan.learning_rate, lr_scheduler_type="constant", save_steps=0,
    )  # fmt: skip
    runs = []
    if rank == 0:
        alone = ExpertParallelTrainer(bench_model(config, device), options, None, device)
        runs.append(timed_steps(alone, rows, plan.warmup_steps, plan.steps))
        del alone
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    trainer = ExpertParallelTrainer(bench_model(config, device), options, mesh, device)
    runs.append(timed_steps(trainer, rows, plan.warmup_steps, plan.steps))
    if rank == 0:
        from hf_deepseek.evals.bench import machine_description

        runs[1]["scaling"] = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
        result = {"command": command, "machine": machine_description(device), "plan": asdict(plan), "runs": runs}
        (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
        (out / "bench_train_parallel.md").write_text(f"`{command}`\n\n{markdown_table(runs)}\n")
    dist.destroy_process_group()


def markdown_table(runs: list[dict[str, Any]]) -> str:
    rows = ["| processes | ms/step | tokens/s | tokens/s per GPU | scaling vs 1 |", "|---|---|---|---|---|"]
    for run in runs:
        scaling = run.get("scaling", 1.0)
        rows.append(
            f"| {run['processes']} | {run['step_ms']:.1f} | {run['tokens_per_s']:,.0f} | "
            f"{run['tokens_per_s_per_gpu']:,.0f} | {scaling:.2f}x |"
        )
    return "\n".join(rows)


def run_parallel_train_bench_from_args(args) -> dict[str, Any]:
    """`hf-deepseek bench train --num-processes N`: write the plan, start torchrun, print and return the results."""
    from hf_deepseek import DeepSeekConfig
    from hf_deepseek.parallel.training import check_expert_split

    processes = args.num_processes
    if processes < 2:
        raise UsageError(f"--num-processes {processes}: the parallel bench compares N >= 2 processes with one")
    plan = plan_from_args(args)
    check_expert_split(DeepSeekConfig(**plan.config).n_routed_experts, processes)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = ["hf-deepseek bench train", f"--num-processes {processes}"]
    for name in ("tiny", "shape", "batch_size", "seq_len", "steps", "warmup_steps"):
        value = getattr(args, name, None)
        if value not in (None, False):
            flag = "--" + name.replace("_", "-")
            words.append(flag if value is True else f"{flag} {value}")
    (out / PLAN_FILE).write_text(json.dumps({"plan": asdict(plan), "command": " ".join(words)}))
    (out / RESULT_FILE).unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "hf_deepseek.evals.bench_train_parallel", str(out)]  # fmt: skip
    print("launching:", " ".join(command), flush=True)
    status = subprocess.call(command)
    if status:
        raise SystemExit(status)
    result = json.loads((out / RESULT_FILE).read_text())
    print(markdown_table(result["runs"]), flush=True)
    return result


if __name__ == "__main__":
    run_worker(sys.argv[1])
