"""`make demo` (`hf-deepseek demo`): the DeepSeek-R1 story end to end on a CPU, in four narrated stages.

1. The R1 recipe in miniature: a cold-start SFT from scratch on worked solutions (a 0.4M-parameter model, to see
   the format being learned), then GRPO with accuracy + format rewards from the shipped SFT-only ancestor, which gets
   part of its sampled answers right; reward and response-length curves as PNG.
2. The demo's R1 model (`checkpoints/hf-deepseek-r1-tiny`, the full recipe) and its SFT-only ancestor, evaluated
   by lm-eval on held-out sums: greedy pass@1 with Wilson 95% intervals.
3. What the architecture buys on that model: latent KV cache bytes against full multi-head attention, expert-load
   balance, and MTP self-speculative decoding's acceptance rate and speed-up on its own outputs.
4. The command that opens the chat on it.
Every figure printed is computed in the run that prints it.
"""

import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, ProgressCallback

DEFAULT_CHECKPOINT = "checkpoints/hf-deepseek-r1-tiny"
SFT_CHECKPOINT = "checkpoints/hf-deepseek-r1-tiny-sft"
TASK = "addition"  # the demo model's task: 3-digit sums
EVAL_TASK = f"hfds_{TASK}"  # the lm-eval task of the same problems
# stage 1's model trained from scratch: the demo model's architecture at 0.4M parameters; the value head dim
# equals the query/key head dim (24) so that CPU attention takes PyTorch's fused kernel (1.7x faster than 16 vs 24)
# what the demo's GRPO trains: a step of norm ~0.02 along the policy gradient of the embeddings or attention already
# lowers the log-probability of the rewarded samples (the attention that finds each digit is that sharp), so updates
# of the whole model that are large enough to show in 18 steps wreck it; the head and final norm respond smoothly
GRPO_TRAINABLE = r"^(lm_head|model\.norm)\."
MINIATURE = dict(
    hidden_size=96, intermediate_size=256, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
)  # fmt: skip


@dataclass
class DemoOptions:
    """What `hf-deepseek demo` runs; the defaults fit a 2-core CPU in about five minutes."""

    recipe: str = "r1_tiny"
    device: str = "cpu"
    sft_steps: int = 120
    grpo_steps: int = 18
    output_dir: str = "outputs/demo"
    checkpoint: str = DEFAULT_CHECKPOINT
    sft_checkpoint: str = SFT_CHECKPOINT
    grpo_init: str = SFT_CHECKPOINT  # `sft`: GRPO from stage 1's own SFT model instead
    # 3-digit sums at 1.5: the ancestor answers ~87% greedily but ~35% of its samples are right, its errors being
    # single unlikely digits drawn by the hot sampling; GRPO sharpens that away by training only the output head
    # and final norm (`GRPO_TRAINABLE`) at a learning rate the whole model would not survive
    grpo_temperature: float = 1.5
    grpo_learning_rate: float = 2.5e-2
    grpo_prompts: int = 32  # problems per GRPO step, 8 samples each
    eval_limit: int = 500
    probe_prompts: int = 6
    overrides: list[str] = field(default_factory=list)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class NarratedProgress(ProgressCallback):
    """The Trainer's progress bar with the latest loss or reward as its postfix instead of printed log lines."""

    def __init__(self, keys: tuple[str, ...]):
        super().__init__()
        self.keys = keys

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {
                k.split("/")[1] if k.startswith("rewards/") else k: f"{logs[k]:.3f}"
                for k in self.keys
                if isinstance(logs.get(k), int | float)
            }
            self.training_bar.set_postfix(shown, refresh=False)


def _quiet() -> None:
    """Keep the narration readable: no per-row dataset bars, library notices or lm-eval info logs."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    for name in ("lm-eval", "lm_eval", "bitsandbytes", "accelerate", "datasets", "trl", "hf_deepseek"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _series(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in history if isinstance(row.get(key), int | float) and "step" in row]


def _ends(points: list[tuple[int, float]], window: int = 3) -> tuple[float, float]:
    values = [v for _, v in points] or [float("nan")]
    window = max(1, min(window, len(values) // 2 or 1))
    return statistics.mean(values[:window]), statistics.mean(values[-window:])


def stage_recipe(options: DemoOptions) -> dict[str, Any]:
    """The recipe with the demo's step counts, output folder, device and data sizes, then the user's overrides."""
    from hf_deepseek.trainers.recipes import apply_overrides, load_recipe

    recipe = load_recipe(options.recipe)
    recipe["output_root"] = options.output_dir
    recipe["model"]["config"].update(MINIATURE)
    shipped = (Path(options.grpo_init) / "config.json").is_file()
    recipe["grpo"]["init"] = options.grpo_init if shipped else "sft"
    use_cpu = not options.device.startswith("cuda")
    for stage, steps, logging_steps in (("sft", options.sft_steps, 5), ("grpo", options.grpo_steps, 1)):
        args = recipe[stage].setdefault("args", {})
        args.update(max_steps=steps, logging_steps=logging_steps, save_strategy="no", report_to="none")
        args.update(use_cpu=use_cpu, gradient_checkpointing=False, dataloader_num_workers=0)
        args.pop("dataset_num_proc", None)
        prompts_per_step = args.get("per_device_train_batch_size", 8)
        if stage == "sft":  # single-turn 3-digit sums: short sequences, ~0.3 s a step on one core
            args.update(per_device_train_batch_size=16, warmup_steps=10, learning_rate=3e-3, max_length=384)
            args["assistant_only_loss"] = True
            prompts_per_step = 16
        if stage == "grpo":  # `grpo_prompts` problems x 8 samples a step
            args.update(num_generations=8, per_device_train_batch_size=8 * options.grpo_prompts, warmup_steps=0)
            args["max_completion_length"] = 160
            args.update(temperature=options.grpo_temperature, learning_rate=options.grpo_learning_rate)
            args["trainable_parameters"] = GRPO_TRAINABLE
            prompts_per_step = options.grpo_prompts
        count = max(64, steps * prompts_per_step)  # enough problems for the run, no more to tokenize
        if stage == "sft":
            recipe[stage]["data"] = {"kind": "cold_start", "tasks": {TASK: count}, "seed": 0}
        else:  # the ancestor's own task (training side of the split), where its sampling errors are noise
            recipe[stage]["data"] = {"kind": "problems", "tasks": {TASK: count}, "seed": 1}
    return apply_overrides(recipe, "sft", options.overrides)


def _reward_key(history: list[dict[str, Any]], name: str) -> str | None:
    keys = {k for row in history for k in row if k.startswith("rewards/") and name in k and k.endswith("/mean")}
    return min(keys) if keys else None


def stage_training(options: DemoOptions, console: Console) -> dict[str, Any]:
    """Stage 1: data and tokenizer, then SFT and GRPO from scratch; returns the curves' first and last values."""
    from hf_deepseek.data import build_tokenizer
    from hf_deepseek.data.r1 import cold_start_completion
    from hf_deepseek.data.reasoning_tasks import task_examples
    from hf_deepseek.trainers.plotting import plot_stage_curves
    from hf_deepseek.trainers.recipes import run_stage

    recipe = stage_recipe(options)
    tokenizer = build_tokenizer()
    example = next(task_examples(TASK, 1, seed=0))
    console.rule("[bold]1. The R1 recipe in miniature")
    console.print(
        f"Tokenizer: {len(tokenizer)} tokens (characters, chat roles, <think>/<answer> tags). Task: 3-digit "
        "addition from the project's generator; a hash of each problem keeps training and held-out sums apart.\n"
        f"A cold-start SFT example:  [cyan]{example['question']}[/] -> "
        f"[green]{cold_start_completion(example)!r}[/]"
    )
    config = recipe["model"]["config"]
    grpo_init = recipe["grpo"]["init"]
    start = "stage 1's SFT model" if grpo_init == "sft" else f"the shipped SFT-only ancestor ({grpo_init})"
    console.print(
        f"Cold-start SFT from scratch, {options.sft_steps} steps on {options.device}: DeepSeek-V3 in miniature "
        f"(hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, MLA with a "
        f"{config['kv_lora_rank']}-wide latent, {config['n_routed_experts']} routed experts + "
        f"{config['n_shared_experts']} shared, 1 MTP module)."
    )
    sft = run_stage("sft", recipe, callbacks=[NarratedProgress(("loss", "mtp_loss", "mean_token_accuracy"))])
    sft_history = sft.state.log_history
    loss_first, loss_last = _ends(_series(sft_history, "loss"))
    acc_first, acc_last = _ends(_series(sft_history, "mean_token_accuracy"))
    console.print(
        f"SFT: training loss {loss_first:.2f} -> {loss_last:.2f}; next-token accuracy on the worked solutions "
        f"{acc_first:.0%} -> {acc_last:.0%} (means of the first and last logged steps)."
    )
    grpo_args = recipe["grpo"]["args"]
    console.print(
        f"GRPO from {start}, {options.grpo_steps} steps: each step samples {grpo_args['num_generations']} answers "
        f"to each of {grpo_args['per_device_train_batch_size'] // grpo_args['num_generations']} 3-digit sums "
        f"at temperature {grpo_args['temperature']} (greedy, the ancestor gets ~87% right; this hot, only about a "
        "third of its samples are right, each wrong one through an unlikely digit) and rewards them by rule (right "
        "answer; <think>/<answer> format). It trains the output head and final norm, which sharpen the sampling; "
        "the attention that finds the digits is too sharp for a few large CPU steps."
    )
    reward_keys = ("reward", "rewards/accuracy_reward/mean", "rewards/format_reward/mean", "completions/mean_length")
    grpo = run_stage("grpo", recipe, callbacks=[NarratedProgress(reward_keys)])
    grpo_history = grpo.state.log_history
    summary = {"sft_loss": (loss_first, loss_last)}
    lines = []
    for name in ("accuracy", "format"):
        if key := _reward_key(grpo_history, name):
            first, last = _ends(_series(grpo_history, key))
            summary[f"grpo_{name}"] = (first, last)
            lines.append(f"{name} reward {first:.2f} -> {last:.2f}")
    if lengths := _series(grpo_history, "completions/mean_length"):
        first, last = _ends(lengths)
        lines.append(f"mean response length {first:.0f} -> {last:.0f} tokens")
    console.print(
        f"GRPO: {'; '.join(lines)} (means of the first and last 3 logged steps, "
        f"{grpo_args['per_device_train_batch_size']} samples each). The demo model's GRPO stage trained the "
        "whole model at 2,048 samples a step on a GPU; stage 2 measures what it added to greedy answers."
    )
    curves = plot_stage_curves(
        [("sft", "sft", sft_history), ("grpo", "grpo", grpo_history)], Path(options.output_dir) / "curves.png"
    )
    console.print(
        f"Curves: [cyan]{curves}[/] (and every logged metric in {options.output_dir}/{{sft,grpo}}/plots/); "
        f"the model: {options.output_dir}/grpo."
    )
    return summary


def _pass_at_1(results: dict[str, Any], task: str) -> float:
    metrics = results["results"][task]
    return next(v for k, v in metrics.items() if k.startswith("pass@1,"))


def stage_evaluation(options: DemoOptions, console: Console) -> dict[str, Any]:
    """Stage 2: lm-eval on held-out sums for the demo's R1 model and its SFT-only ancestor."""
    from hf_deepseek.evals.harness import evaluate_model

    console.rule("[bold]2. The R1 model, evaluated by lm-eval on held-out sums")
    table: dict[str, Any] = {}
    for name, path in (("R1 model", options.checkpoint), ("SFT-only ancestor", options.sft_checkpoint)):
        if not (Path(path) / "config.json").is_file():
            console.print(f"[yellow]No checkpoint at {path}; skipping it.[/]")
            continue
        model = AutoModelForCausalLM.from_pretrained(path).to(options.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        console.print(f"[bold]{name}[/] ({path}): greedy on {options.eval_limit} held-out sums")
        kwargs = dict(batch_size=100, apply_chat_template=True)  # the chat turns the model was trained on
        greedy = evaluate_model(model, tokenizer, tasks=[EVAL_TASK], limit=options.eval_limit, **kwargs)
        p1 = _pass_at_1(greedy, EVAL_TASK)
        n = int(greedy["n-samples"][EVAL_TASK]["effective"])
        low, high = wilson_interval(round(p1 * n), n)
        fmt = greedy["results"][EVAL_TASK].get("format,none", float("nan"))
        table[name] = {"pass@1": p1, "n": n, "interval": (low, high), "format": fmt}
    for name, row in table.items():
        console.print(
            f"  {name:<24} greedy pass@1 {row['pass@1']:6.1%}  95% CI [{row['interval'][0]:.1%}, "
            f"{row['interval'][1]:.1%}] (n={row['n']}, well-formatted {row['format']:.0%})"
        )
    if len(table) == 2:
        default, sft = table.values()
        overlap = default["interval"][0] <= sft["interval"][1] and sft["interval"][0] <= default["interval"][1]
        console.print(
            "The R1 model (GRPO, then SFT on conversations) against its SFT-only ancestor on the same "
            f"held-out sums: {default['pass@1']:.1%} vs {sft['pass@1']:.1%} "
            f"({100 * (default['pass@1'] - sft['pass@1']):+.1f} points; the intervals "
            f"{'overlap' if overlap else 'do not overlap'}). Both reason in the trained format before answering."
        )
    return table


def _probe_prompts(tokenizer, count: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    from hf_deepseek.evals.task_data import load_rows, prompt_text

    prompts = []
    for row in load_rows(TASK)["test"][:count]:
        messages = [{"role": "user", "content": prompt_text(row)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        prompts.append((torch.tensor([ids]), row))
    return prompts


@torch.inference_mode()
def stage_architecture(options: DemoOptions, console: Console) -> dict[str, Any]:
    """Stage 3: latent KV cache against full MHA, expert-load balance, MTP acceptance and speed-up."""
    from hf_deepseek.evals.bench import (
        cache_nbytes,
        full_mha_bytes_per_token_per_layer,
        mtp_speculation,
        prefill,
    )
    from hf_deepseek.trainers.balancing import ExpertLoadTracker, balance_metrics

    console.rule("[bold]3. What the architecture buys, measured on the R1 model")
    model = AutoModelForCausalLM.from_pretrained(options.checkpoint).to(options.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.checkpoint)
    config = model.config
    prompts = _probe_prompts(tokenizer, options.probe_prompts)
    eos = tokenizer.eos_token_id
    # its own answers to held-out sums: prompt + greedy completion, the sequences every probe below runs on
    sequences = []
    for ids, _ in tqdm(prompts, desc="greedy answers", unit="sum"):
        out = model.generate(ids.to(options.device), attention_mask=torch.ones_like(ids).to(options.device),
                             max_new_tokens=160, do_sample=False, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
        sequences.append(out)
    longest = max(sequences, key=lambda s: s.shape[1])
    held, layers, _ = cache_nbytes(prefill(model, longest))
    tokens = longest.shape[1]
    mha = full_mha_bytes_per_token_per_layer(config, 4) * tokens * layers
    console.print(
        f"Latent KV cache (MLA): {held:,} bytes for a {tokens}-token conversation over {layers} layers, measured "
        f"in the cache; full multi-head attention with the same heads would hold {mha:,} bytes: "
        f"{mha / held:.1f}x smaller ({config.kv_lora_rank}+{config.qk_rope_head_dim} values per token and layer "
        f"instead of {config.num_attention_heads}x({config.qk_nope_head_dim}+{config.qk_rope_head_dim}+"
        f"{config.v_head_dim}))."
    )
    tracker = ExpertLoadTracker(model.model, model.routers())
    with tracker.recording():
        for sequence in sequences:
            model(input_ids=sequence, attention_mask=torch.ones_like(sequence))
    load = tracker.pop()
    tracker.remove()
    metrics = balance_metrics(load)
    shares = (load.float() / load.sum(dim=-1, keepdim=True)).mean(0)
    console.print(
        f"Expert load (aux-loss-free balancing): over {int(load[0].sum()) // config.num_experts_per_tok:,} routed "
        f"tokens the {config.n_routed_experts} experts took {', '.join(f'{s:.0%}' for s in shares.tolist())}; "
        f"max load / mean load - 1 = {metrics['balance/max_violation']:.2f}, load entropy "
        f"{metrics['balance/load_entropy']:.3f} of a perfect 1."
    )
    console.print(f"MTP self-speculative decoding on {len(prompts)} held-out sums (greedy, batch 1):")
    spec = mtp_speculation(
        model, [ids.to(options.device) for ids, _ in prompts], 160, eos, torch.device(options.device)
    )
    speedup = spec["speculative_tok_s"] / spec["greedy_tok_s"]
    console.print(
        f"The MTP module's draft of the token after next was accepted {spec['mtp_acceptance']:.0%} of the time "
        f"({spec['mtp_drafts']} drafts): {spec['mtp_tokens_per_pass']:.2f} tokens per main-model pass, "
        f"{spec['speculative_tok_s']:.0f} tokens/s against {spec['greedy_tok_s']:.0f} for plain greedy "
        f"generate ({speedup:.2f}x), same tokens out."
    )
    return {"cache_bytes": held, "mha_bytes": mha, **metrics, **spec, "speedup": speedup}


def run_demo(options: DemoOptions | None = None) -> dict[str, Any]:
    """Run the four stages and print the narrated summary; returns the figures it printed."""
    options = options or DemoOptions()
    console = Console()
    torch.set_num_threads(1)  # a tiny model gains little from 2 threads and loses ~100x when a core is busy
    _quiet()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    if options.sft_steps > 0:
        results["training"] = stage_training(options, console)
    if (Path(options.checkpoint) / "config.json").is_file():
        if options.eval_limit > 0:
            results["evaluation"] = stage_evaluation(options, console)
        results["architecture"] = stage_architecture(options, console)
        chat = f"make chat CHAT_MODEL={options.checkpoint}"  # plain `make chat`: the larger add/sub model
    else:
        console.print(f"[yellow]No checkpoint at {options.checkpoint}: stages 2 and 3 need one.[/]")
        chat = f"make chat CHAT_MODEL={options.output_dir}/grpo"
    console.rule("[bold]4. Chat with it")
    console.print(
        f"Demo done in {time.perf_counter() - started:.0f} s. Open the chat (streamed replies, the <think> part "
        f"collapsible, an MTP switch) in your browser:\n\n    [bold green]{chat}[/]\n"
    )
    return results
