"""Parallelism applied to a built model from outside the network (torchtitan's rule): expert parallelism, and
FSDP2 around it."""

from .expert_parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    fully_shard_around_experts,
    gather_experts,
)

__all__ = ["ExpertParallelExperts", "apply_expert_parallel", "fully_shard_around_experts", "gather_experts"]
