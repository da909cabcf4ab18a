"""Expert parallelism: the routed experts of each MoE layer spread over the ranks of a process group.

Rank r of a group of P holds experts [r * E/P, (r + 1) * E/P). Each rank routes its own tokens, sends every
(token, choice) row to the rank that holds its expert with an all-to-all of uneven splits, runs its local experts
on the rows it received from every rank, and sends the results back with the opposite all-to-all; both
all-to-alls are differentiable (`all_to_all_single_autograd`), so backward moves the gradients the same way.
Everything but the routed experts is replicated (DDP) or sharded by FSDP2 with the experts left out
(`fully_shard_around_experts`), and those gradients are averaged over the group as usual; an expert's gradient
sums the rows of every rank, so a hook divides it by the group size to match: each rank's loss is the mean over
its own batch, as under DDP.

    apply_expert_parallel(model, group)   # in place; every rank must build the same model first
    fully_shard_around_experts(model)     # optional: FSDP2 for the other parameters
    gather_experts(model)                 # back to whole experts on every rank, e.g. before save_pretrained
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..modeling.moe import GatherTokenRows, PermuteRows, RoutedExperts, count_per_expert


class ExpertParallelExperts(RoutedExperts):
    """This rank's share of one layer's routed experts; `forward` takes and returns this rank's tokens only."""

    def __init__(self, experts: RoutedExperts, group: dist.ProcessGroup | None = None):
        nn.Module.__init__(self)
        self.group = group if group is not None else dist.group.WORLD
        self.world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        total = experts.num_experts
        if total % self.world:
            raise ValueError(f"{total} routed experts cannot be split evenly over {self.world} expert-parallel ranks")
        self.global_experts, self.num_experts = total, total // self.world  # num_experts: the local ones
        first = rank * self.num_experts
        self.expert_range = (first, first + self.num_experts)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[first : first + self.num_experts].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[first : first + self.num_experts].clone())
        self.act_fn = experts.act_fn
        self._average_grads()

    def _average_grads(self) -> None:
        """Divide each weight's gradient by the group size (the group-average that DDP / FSDP apply elsewhere),
        once per weight tensor: `to_empty` and some `.to()` calls replace the parameters, so `_apply` calls it again."""
        for weight in (self.gate_up_proj, self.down_proj):
            if not getattr(weight, "_averaged_over_group", False):
                weight.register_hook(lambda grad: grad / self.world)
                weight._averaged_over_group = True

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._average_grads()
        return result

    def whole(self, share: torch.Tensor) -> torch.Tensor:
        """Collective: this rank's share of an expert tensor [E/P, ...] joined with every rank's -> [E, ...]."""
        parts = [torch.empty_like(share) for _ in range(self.world)]
        dist.all_gather(parts, share.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], indices/weights [N, k] (global expert ids) -> sum_k weight_k * expert_k(x) [N, d]."""
        num_tokens, top_k = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # (token, choice) rows sorted by expert, hence by the rank that holds it
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        x_sorted = GatherTokenRows.apply(x, order, inverse, top_k)
        counts = count_per_expert(flat, self.global_experts)  # [E] rows this rank sends to each expert
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [P * E/P]: rows each rank sends my experts
        received = received.view(self.world, self.num_experts)
        send_splits = counts.view(self.world, self.num_experts).sum(dim=1).tolist()  # the splits live on the host
        recv_splits = received.sum(dim=1).tolist()
        rows = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.group)  # grouped by source rank

        # regroup the received rows by local expert (within each source rank they are already in expert order)
        local = torch.arange(self.num_experts, device=rows.device).repeat(self.world)
        expert_of_row = torch.repeat_interleave(local, received.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        undo = torch.empty_like(by_expert).scatter_(0, by_expert, torch.arange(by_expert.numel(), device=rows.device))
        rows = PermuteRows.apply(rows, by_expert, undo)
        out = self._local_experts(rows, received.sum(dim=0))
        out = PermuteRows.apply(out, undo, by_expert)

        back = all_to_all_single_autograd(out, send_splits, recv_splits, self.group)  # [N*k, d] in sorted order
        back = PermuteRows.apply(back, inverse, order).view(num_tokens, top_k, -1)  # (token, choice) order
        return (back * weights[..., None].to(back.dtype)).sum(dim=1).to(x.dtype)

    def _local_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on their rows [R, d] in local-expert order, `counts` [E/P] rows each."""
        return self._sorted_experts(rows, counts)

    def extra_repr(self) -> str:
        return f"experts {self.expert_range[0]}..{self.expert_range[1] - 1} of {self.global_experts}"


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace, in place, every `RoutedExperts` of `model` by this rank's `ExpertParallelExperts` share (the
    weights are taken from the full module, so every rank must hold the same model first). Returns the model."""
    for name, module in list(model.named_modules()):
        if type(module) is RoutedExperts:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ExpertParallelExperts(module, group))
    return model


def gather_experts(model: nn.Module) -> nn.Module:
    """Undo `apply_expert_parallel` in place: every rank gets back whole `RoutedExperts` (all-gathered over each
    module's group), so `save_pretrained` writes the usual layout whatever the parallel one was. Returns the
    model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ExpertParallelExperts):
            whole = [module.whole(weight) for weight in (module.gate_up_proj, module.down_proj)]
            experts = RoutedExperts.__new__(RoutedExperts)
            nn.Module.__init__(experts)
            experts.num_experts, experts.act_fn = module.global_experts, module.act_fn
            experts.gate_up_proj, experts.down_proj = nn.Parameter(whole[0]), nn.Parameter(whole[1])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, experts)
    return model


def fully_shard_around_experts(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2 (`fully_shard`) on every decoder and MTP layer and on the whole model, leaving out the parameters of
    the expert-parallel experts, which are already split by expert. Returns the model."""
    from torch.distributed.fsdp import fully_shard

    experts = {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=experts & set(layer.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=experts)
    return model
