"""SFT tokens/s on the GPUs of one host through accelerate, with the shipped FSDP2 config: run it once per process
count, with the same per-GPU batch, and compare.

    accelerate launch --config_file hf_deepseek/trainers/accelerate/fsdp2.yaml --num_processes N \\
        benchmarks/sft_throughput.py --json sft_N.json [recipe overrides, e.g. max_steps=40]

It runs `hf_deepseek.trainers.recipes.run_stage` (what `hf-deepseek train sft` runs) on the `r1_tiny` recipe's data
(3-digit addition with worked steps, ~205 tokens a conversation) with a larger model (below), and times the steps
after `--skip` warm-up steps from TRL's `num_tokens` (the non-padding tokens of all processes).
"""

import argparse
import json
import time

from transformers import TrainerCallback

from hf_deepseek.trainers.recipes import apply_overrides, load_recipe, run_stage

# ~1.0B parameters (8 layers, hidden 1024, 32 routed experts top-4 + 1 shared, MLA), the project's tokenizer
MODEL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=704,
    num_hidden_layers=8,
    num_attention_heads=8,
    first_k_dense_replace=1,
    n_routed_experts=32,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    q_lora_rank=512,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    num_nextn_predict_layers=1,
    max_position_embeddings=1024,
)
ARGS = dict(
    max_steps=40,
    per_device_train_batch_size=64,
    learning_rate=3e-4,
    bf16=True,
    gradient_checkpointing=False,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    output_dir="outputs/sft_throughput",
)


class Throughput(TrainerCallback):
    """(step, seconds, cumulative tokens of all processes) at every log."""

    def __init__(self):
        self.points: list[tuple[int, float, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.points.append((state.global_step, time.perf_counter(), float(logs["num_tokens"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where rank 0 writes the result")
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    args, overrides = parser.parse_known_args()
    recipe = load_recipe("r1_tiny")
    recipe["model"]["config"] = dict(MODEL)
    recipe["sft"]["data"]["tasks"] = {"addition": 8000}
    recipe["sft"]["args"] = {**recipe["sft"]["args"], **ARGS}
    recipe = apply_overrides(recipe, "sft", overrides)
    meter = Throughput()
    trainer = run_stage("sft", recipe, callbacks=[meter])
    if not trainer.is_world_process_zero():
        return
    (step0, t0, tokens0), (step1, t1, tokens1) = meter.points[args.skip - 1], meter.points[-1]
    routers = trainer.deepseek_model.routers()
    result = {
        "processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "parameters": sum(p.numel() for p in trainer.deepseek_model.parameters()),
        "timed_steps": step1 - step0,
        "tokens_per_s": (tokens1 - tokens0) / (t1 - t0),
        "step_ms": 1000 * (t1 - t0) / (step1 - step0),
        "final_loss": trainer.state.log_history[-2].get("loss"),
        "router_bias_abs_sum": sum(r.e_score_correction_bias.abs().sum().item() for r in routers),
    }
    print(json.dumps(result), flush=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
