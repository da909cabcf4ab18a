"""Expert-parallel training: `hf-deepseek train STAGE --recipe R --num-processes N --expert-parallel` (torchrun).

Every rank builds the stage's model, keeps E/N routed experts of each MoE layer (`apply_expert_parallel`) and lets
FSDP2 shard the rest (`fully_shard_around_experts`) on a one-dimensional DeviceMesh. The stage's dataset is
tokenized and packed into rows of `max_length` tokens (no padding, so each rank's mean loss weighs the same); step s
trains the global batch of N x `per_device_train_batch_size` rows, rank r taking its slice. A step is AdamW with
the gradient clipped to `max_grad_norm` over the global norm (the sharded non-expert gradients and every rank's
expert gradients together), the model's MTP and balance losses, and the aux-loss-free router-bias update from the
expert load of the whole global batch (summed over the ranks). One process (no `torch.distributed`) runs the same
loop on the whole batch, which is what the tests compare against.

Checkpoints (`output_dir/checkpoint-STEP`, every `save_steps`, and the final model in `output_dir`) are the usual
`save_pretrained` folder, loadable by one process, plus `optimizer.safetensors` (AdamW's moments, whole tensors
named after the parameters) and `trainer_state.json`; `resume_from_checkpoint` (a folder, or true for the latest
in output_dir) continues from one with any process count that divides the experts.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..trainers.balancing import RouterBiasBalancer
from ..usage_errors import UsageError
from .checkpoint import expert_parameters, load_expert_parallel, save_expert_parallel, whole_tensor
from .expert_parallel import apply_expert_parallel, fully_shard_around_experts


@dataclass
class ParallelTrainOptions:
    """The stage's `args` that this loop reads (the names and defaults of the SFT config); others are ignored."""

    output_dir: str = "outputs/expert-parallel"
    max_steps: int = 100
    per_device_train_batch_size: int = 8
    max_length: int = 1024  # tokens per packed row
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mtp_loss_weight: float | None = None
    mtp_loss_weight_final: float | None = None
    mtp_loss_weight_switch: float = 0.68
    router_bias_update_speed: float = 1e-3
    router_bias_update_schedule: str = "constant"
    router_bias_update_end: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500  # 0 (or save_strategy "no"): only the final model
    seed: int = 42
    bf16: bool = False
    resume_from_checkpoint: str | bool | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ParallelTrainOptions:
        known = {f.name for f in fields(cls)}
        options = cls(**{k: v for k, v in args.items() if k in known and v is not None})
        if args.get("save_strategy") == "no":
            options.save_steps = 0
        options.warmup_steps = int(options.warmup_steps)
        return options


def check_expert_split(n_routed_experts: int, processes: int) -> None:
    """Refuse a process count that cannot hold an equal share of the routed experts, or fewer than two."""
    if processes < 2:
        raise UsageError(
            "--expert-parallel needs at least 2 processes: add --num-processes N, or start it with "
            "`torchrun --nproc-per-node N -m hf_deepseek.cli train ... --expert-parallel`"
        )
    if n_routed_experts % processes:
        fits = [n for n in range(2, n_routed_experts + 1) if n_routed_experts % n == 0]
        raise UsageError(
            f"{n_routed_experts} routed experts cannot be split evenly over {processes} processes: use a process "
            f"count that divides {n_routed_experts} ({', '.join(map(str, fits))})"
        )


def packed_rows(dataset, tokenizer, length: int) -> torch.Tensor:
    """The dataset's conversations (`messages`, or `prompt` + `completion`) or `text`, tokenized, joined and cut
    into rows of `length` tokens [rows, length] (the last partial row dropped)."""
    ids: list[int] = []
    for row in dataset:
        if "messages" in row or isinstance(row.get("prompt"), list):
            messages = row["messages"] if "messages" in row else [*row["prompt"], *row["completion"]]
            ids += list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
        elif "text" in row:
            ids += tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        else:
            raise UsageError(f"expert-parallel training reads messages, prompt/completion or text rows: {list(row)}")
    rows = len(ids) // length
    if rows == 0:
        raise UsageError(f"the dataset has {len(ids)} tokens, fewer than one row of max_length={length}")
    return torch.tensor(ids[: rows * length]).view(rows, length)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip every gradient by the global norm and return that norm: the non-expert gradients (FSDP2 shards or
    replicated) give their whole norm, and each expert-parallel group sums its ranks' expert norms."""
    experts = expert_parameters(model)
    named = dict(model.named_parameters())
    expert_grads = [named[n].grad for n in experts if named[n].grad is not None]
    other_grads = [p.grad for n, p in named.items() if n not in experts and p.grad is not None]
    other = torch.nn.utils.get_total_norm(other_grads)
    if isinstance(other, DTensor):
        other = other.full_tensor()
    squared = other.double() ** 2
    if experts:  # every rank joins the all-reduce, with or without expert gradients
        expert_squared = torch.nn.utils.get_total_norm(expert_grads).double().to(squared.device) ** 2
        dist.all_reduce(expert_squared, group=next(iter(experts.values())).group)
        squared = squared + expert_squared.to(squared.device)
    total = squared.sqrt().float()
    coefficient = min(1.0, max_norm / (total.item() + 1e-6))
    if coefficient < 1.0:
        for grad in [*other_grads, *expert_grads]:
            grad.mul_(coefficient)
    return total


def distributed_mesh():
    """(DeviceMesh over every rank, device) when torch.distributed is initialised or torchrun set WORLD_SIZE > 1;
    (None, device) for one process."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        return None, device
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("ep",)), device


class ExpertParallelTrainer:
    """The loop over packed rows for one model: expert-parallel + FSDP2 over `mesh`, or one process (mesh None)."""

    def __init__(self, model: nn.Module, options: ParallelTrainOptions, mesh=None, device=None, tokenizer=None):
        from transformers import get_scheduler

        self.options, self.mesh, self.tokenizer = options, mesh, tokenizer
        self.device = device or torch.device("cpu")
        self.world = mesh.size() if mesh is not None else 1
        self.rank = mesh.get_local_rank() if mesh is not None else 0
        if mesh is not None and not expert_parameters(model):
            apply_expert_parallel(model, mesh.get_group())  # before moving: only this rank's experts reach the device
        model.to(self.device).train()
        if mesh is not None:
            fully_shard_around_experts(model, mesh)
        self.model, self.step = model, 0
        experts = set(expert_parameters(model))
        named = list(model.named_parameters())
        groups = [[p for n, p in named if n not in experts], [p for n, p in named if n in experts]]
        self.optimizer = torch.optim.AdamW(
            [{"params": g} for g in groups if g],  # FSDP2's DTensors and the plain expert tensors apart
            lr=options.learning_rate,
            betas=(options.adam_beta1, options.adam_beta2),
            eps=options.adam_epsilon,
            weight_decay=options.weight_decay,
        )
        self.scheduler = get_scheduler(
            options.lr_scheduler_type, self.optimizer, options.warmup_steps, options.max_steps
        )
        reduce = self._sum_over_ranks if mesh is not None else (lambda t: t)
        self.balancer = RouterBiasBalancer(
            model.model, model.routers(), options.router_bias_update_speed, options.router_bias_update_schedule,
            options.router_bias_update_end, reduce=reduce,
        )  # fmt: skip

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.mesh.get_group())
        return tensor

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().float().reshape(1).clone()
        if self.mesh is not None:
            self._sum_over_ranks(value)
        return value.item() / self.world

    def batch(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's rows of global batch `step` (the rows cycle when the data runs out)."""
        per_rank = self.options.per_device_train_batch_size
        first = step * per_rank * self.world + self.rank * per_rank
        return rows[(torch.arange(per_rank) + first) % rows.shape[0]].to(self.device)

    def train_step(self, ids: torch.Tensor) -> dict[str, float]:
        """One optimizer step on this rank's rows `ids` [b, T]; returns the global batch's metrics."""
        options, config = self.options, self.model.config
        if options.mtp_loss_weight is not None:
            late = self.step >= options.mtp_loss_weight_switch * options.max_steps
            final = options.mtp_loss_weight_final
            config.mtp_loss_weight = final if late and final is not None else options.mtp_loss_weight
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=options.bf16)
        with self.balancer.recording(), autocast:
            output = self.model(input_ids=ids, labels=ids)
        output.loss.backward()
        grad_norm = clip_grad_norm(self.model, options.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balancer.step(self.step, options.max_steps)
        self.step += 1
        metrics = {"step": self.step, "loss": self._mean_over_ranks(output.loss), "grad_norm": grad_norm.item()}
        if output.mtp_loss is not None:
            metrics["mtp_loss"] = self._mean_over_ranks(output.mtp_loss)
        metrics["learning_rate"] = lr
        balance = self.balancer.pop_metrics()
        if "balance/max_violation" in balance:
            metrics["max_violation"] = balance["balance/max_violation"]
        return metrics

    def train(self, rows: torch.Tensor, progress=print) -> list[dict[str, float]]:
        """Steps from the current one to `max_steps`; rank 0 appends each step's metrics to metrics.jsonl, prints
        every `logging_steps`, saves every `save_steps` and at the end. Returns the metrics of the steps run."""
        options, history = self.options, []
        out = Path(options.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        while self.step < options.max_steps:
            start = time.perf_counter()
            metrics = self.train_step(self.batch(rows, self.step))
            metrics["step_s"] = time.perf_counter() - start
            history.append(metrics)
            if self.rank == 0:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if self.step % max(options.logging_steps, 1) == 0 or self.step == options.max_steps:
                    progress(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if options.save_steps and self.step % options.save_steps == 0 and self.step < options.max_steps:
                self.save(out / f"checkpoint-{self.step}")
        save_expert_parallel(self.model, out, self.tokenizer)
        return history

    def save(self, path: str | Path) -> None:
        """Collective: the model (save_pretrained layout), AdamW's state as whole tensors, the step."""
        path = Path(path)
        save_expert_parallel(self.model, path, self.tokenizer)
        experts = expert_parameters(self.model)
        moments = {}
        for name, param in self.model.named_parameters():
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensor = whole_tensor(state[key], experts.get(name))
                    if self.rank == 0:
                        moments[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
            if "step" in state and self.rank == 0:
                moments[f"{name}.step"] = state["step"].detach().cpu().reshape(1)
        if self.rank == 0:
            save_file(moments, str(path / "optimizer.safetensors"))
            state = {"global_step": self.step, "processes": self.world}
            (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if self.mesh is not None:
            dist.barrier()

    def load_optimizer(self, path: str | Path) -> None:
        """AdamW's state and the step from a checkpoint folder `save` wrote, split for this rank's layout."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        moments = load_file(str(path / "optimizer.safetensors"))
        experts = expert_parameters(self.model)
        for name, param in self.model.named_parameters():
            if f"{name}.step" not in moments:
                continue
            entry = {"step": moments[f"{name}.step"].reshape(())}
            for key in ("exp_avg", "exp_avg_sq"):
                whole = moments[f"{name}.{key}"].to(self.device)
                if isinstance(param, DTensor):
                    entry[key] = distribute_tensor(whole, param.device_mesh, param.placements)
                elif name in experts:
                    first, last = experts[name].expert_range
                    entry[key] = whole[first:last].clone()
                else:
                    entry[key] = whole
            self.optimizer.state[param] = entry
        self.step = state["global_step"]
        with warnings.catch_warnings():  # the schedule replayed to the step (the optimizer's groups may differ)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.step):
                self.scheduler.step()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    steps = [(int(p.name.split("-")[1]), p) for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit()]
    return max(steps)[1] if steps else None


def build_trainer(recipe: dict[str, Any], stage: str, mesh=None, device=None) -> tuple[ExpertParallelTrainer, Any]:
    """The stage's model (new, a saved one, or the checkpoint to resume from: each rank reading its own experts),
    tokenizer and packed rows, in a trainer. Returns (trainer, rows)."""
    from ..trainers.recipes import _resolve_args, build_dataset, build_model_and_tokenizer

    options = ParallelTrainOptions.from_args(_resolve_args(recipe, stage))
    resume = options.resume_from_checkpoint
    if resume is True:
        resume = latest_checkpoint(options.output_dir)
    torch.manual_seed(options.seed)
    if resume:
        from transformers import AutoTokenizer

        from ..modeling.model import DeepSeekForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(resume)
        if mesh is None:
            model = DeepSeekForCausalLM.from_pretrained(resume)
        else:
            model = load_expert_parallel(resume, mesh.get_group(), device=device)
    else:
        model, tokenizer = build_model_and_tokenizer(recipe, stage)
    rows = packed_rows(build_dataset(recipe, stage), tokenizer, options.max_length)
    trainer = ExpertParallelTrainer(model, options, mesh, device, tokenizer)
    if resume:
        trainer.load_optimizer(resume)
    return trainer, rows


def expert_parallel_recipe(args, extra: list[str], processes: int) -> dict[str, Any]:
    """The stage's recipe with its overrides, checked for an expert-parallel run on `processes` processes."""
    from ..trainers.recipes import apply_overrides, check_recipe, load_recipe

    if args.stage == "all":
        raise UsageError("--expert-parallel trains one stage at a time: name the stage, e.g. `train sft`")
    if processes < 2:
        check_expert_split(0, processes)
    recipe = apply_overrides(load_recipe(args.recipe), args.stage, [*args.overrides, *extra])
    check_recipe(recipe, [args.stage])
    check_expert_split(recipe_experts(recipe, args.stage), processes)
    return recipe


def run_expert_parallel_training(args, extra: list[str]) -> None:
    """`hf-deepseek train STAGE --recipe R --expert-parallel` inside each torchrun worker."""
    recipe = expert_parallel_recipe(args, extra, int(os.environ.get("WORLD_SIZE", "1")))
    mesh, device = distributed_mesh()
    try:
        trainer, rows = build_trainer(recipe, args.stage, mesh, device)
        trainer.train(rows)
        if trainer.rank == 0:
            print(f"{args.stage}: saved model and tokenizer to {trainer.options.output_dir}; metrics in metrics.jsonl")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def recipe_experts(recipe: dict[str, Any], stage: str) -> int:
    """n_routed_experts of the stage's model: from `model.config` for a new one, else from the saved config."""
    from ..configuration import DeepSeekConfig
    from ..trainers.recipes import stage_output_dir, stage_trainer

    if stage_trainer(recipe, stage) != "sft":
        raise UsageError(f"--expert-parallel trains SFT stages; {stage!r} is a GRPO stage")
    init = recipe[stage].get("init", "new")
    if init == "new":
        return DeepSeekConfig(**recipe.get("model", {}).get("config", {})).n_routed_experts
    path = stage_output_dir(recipe, init) if isinstance(recipe.get(init), dict) else init
    return DeepSeekConfig.from_pretrained(path).n_routed_experts
