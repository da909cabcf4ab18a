"""Aux-loss-free load balancing (DeepSeek-V3 section 2.1.2) for any training loop, and the balance metrics.

`ExpertLoadTracker` counts, per MoE layer and expert, the real (non-padding) tokens routed there by the forwards
run inside `tracker.recording()`; the trainers record their loss forwards only, so generation, reference-model
passes and the recomputation of gradient checkpointing in backward are never counted. `RouterBiasBalancer` is a
`TrainerCallback`: after each optimizer step it sums the step's counts over all data-parallel ranks, moves each
router's `e_score_correction_bias` by gamma in the direction that evens the load (bias_i += gamma * sign(mean load
- load_i)), and keeps the step's balance metrics. The bias is a buffer of the model, so checkpoints save it.
"""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import TrainerCallback


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio of each row of `load` [..., E]: max load / mean load - 1 (0 is perfectly even)."""
    load = load.float()
    return load.max(dim=-1).values / load.mean(dim=-1).clamp(min=1e-9) - 1


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's load distribution divided by log(E): 1 is perfectly even, 0 all on one expert."""
    probs = load.float() / load.float().sum(dim=-1, keepdim=True).clamp(min=1e-9)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1)
    return entropy / math.log(load.shape[-1])


def balance_metrics(load: torch.Tensor, prefix: str = "balance/") -> dict[str, float]:
    """Per-layer and overall (mean over layers) max violation and load entropy of `load` [num_layers, E]."""
    violation, entropy = max_violation(load), load_entropy(load)
    metrics = {f"{prefix}max_violation": violation.mean().item(), f"{prefix}load_entropy": entropy.mean().item()}
    for layer, (v, h) in enumerate(zip(violation.tolist(), entropy.tolist(), strict=True)):
        metrics[f"{prefix}layer_{layer}/max_violation"] = v
        metrics[f"{prefix}layer_{layer}/load_entropy"] = h
    return metrics


def bias_update_speed(gamma: float, step: int, max_steps: int, schedule: str = "constant", end: float = 1.0) -> float:
    """Gamma for optimizer step `step` of `max_steps`: `constant` keeps `gamma` until the fraction `end` of the run
    and then 0 (DeepSeek-V3: 0.001, then 0 for the last 500B of 14.8T tokens); `linear` decays to 0 at `end`."""
    if schedule not in ("constant", "linear"):
        raise ValueError(f"router bias schedule must be 'constant' or 'linear', got {schedule!r}")
    if max_steps <= 0:
        return gamma
    progress = step / max_steps
    if progress >= end:
        return 0.0
    return gamma if schedule == "constant" else gamma * (1.0 - progress / end)


class ExpertLoadTracker:
    """Sums the expert choices of `routers` over the forwards run inside `recording()`.

    The router's selected indices are read from its output by a forward hook, with padding masked out using the
    backbone's `attention_mask` (a 2-D mask; without one, as in padding-free batches, every token counts).
    """

    def __init__(self, backbone: nn.Module, routers: list[nn.Module]):
        self.routers = routers
        self.counts: torch.Tensor | None = None  # [num_layers, E], int64
        self._recording = False
        self._token_mask: torch.Tensor | None = None
        self._handles = [backbone.register_forward_pre_hook(self._read_mask, with_kwargs=True)]
        self._handles += [r.register_forward_hook(self._make_counter(i)) for i, r in enumerate(routers)]

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def _read_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._token_mask = mask.reshape(-1).bool() if mask is not None and mask.dim() == 2 else None

    def _make_counter(self, layer: int):
        def count(module, args, output) -> None:
            if not self._recording:
                return
            indices = output[0]  # [N, k]
            if self._token_mask is not None and self._token_mask.numel() == indices.shape[0]:
                indices = indices[self._token_mask.to(indices.device)]
            if self.counts is None:
                self.counts = torch.zeros(
                    len(self.routers), module.num_experts, dtype=torch.long, device=indices.device
                )
            self.counts[layer] += torch.bincount(indices.flatten(), minlength=module.num_experts).to(self.counts.device)

        return count

    def pop(self) -> torch.Tensor | None:
        """The counts summed since the last pop, and reset."""
        counts, self.counts = self.counts, None
        return counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel ranks (a no-op in a single process)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def update_router_biases(routers: list[nn.Module], load: torch.Tensor, gamma: float) -> None:
    """bias_i += gamma * sign(mean load - load_i) in each layer: over-loaded experts become less likely."""
    for router, layer_load in zip(routers, load.float(), strict=True):
        bias = router.e_score_correction_bias
        bias += gamma * torch.sign(layer_load.mean() - layer_load).to(bias.device, bias.dtype)


class RouterBiasBalancer(TrainerCallback):
    """Moves the routers' correction biases after every optimizer step from the load counted during that step.

    `metrics` collects each step's balance metrics (and gamma) until `pop_metrics()` averages and clears them; the
    trainers merge them into their logs. `last_load` is the latest step's summed load [num_layers, E].
    """

    def __init__(
        self,
        backbone: nn.Module,
        routers: list[nn.Module],
        gamma: float = 1e-3,
        schedule: str = "constant",
        end: float = 1.0,
        reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum,
    ):
        bias_update_speed(gamma, 0, 1, schedule, end)  # validates the schedule
        self.routers, self.gamma, self.schedule, self.end = routers, gamma, schedule, end
        self.reduce = reduce  # the trainers pass their accelerator's sum, so the ranks are those of the training
        self.tracker = ExpertLoadTracker(backbone, routers)
        self.metrics: dict[str, list[float]] = {}
        self.last_load: torch.Tensor | None = None

    def recording(self) -> contextlib.AbstractContextManager:
        return self.tracker.recording()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.step(state.global_step, state.max_steps)

    def step(self, global_step: int, max_steps: int) -> None:
        """Apply the update for the counts recorded since the previous call (one optimizer step)."""
        if not self.routers:
            return
        load = self.tracker.pop()
        if load is None:  # every rank must join the all-reduce, even one that counted nothing
            device = self.routers[0].e_score_correction_bias.device
            load = torch.zeros(len(self.routers), self.routers[0].num_experts, dtype=torch.long, device=device)
        load = self.reduce(load)
        if load.sum() == 0:
            return
        gamma = bias_update_speed(self.gamma, global_step, max_steps, self.schedule, self.end)
        if gamma > 0:
            update_router_biases(self.routers, load, gamma)
        self.last_load = load
        for key, value in {**balance_metrics(load), "balance/router_bias_update_speed": gamma}.items():
            self.metrics.setdefault(key, []).append(value)

    def pop_metrics(self) -> dict[str, float]:
        metrics = {key: sum(values) / len(values) for key, values in self.metrics.items() if values}
        self.metrics = {}
        return metrics
