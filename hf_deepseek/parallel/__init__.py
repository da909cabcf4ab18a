"""Parallelism applied to a built model from outside the network (torchtitan's rule): expert parallelism, FSDP2
around it, its checkpoints in the usual layout (`checkpoint.py`) and its training loop (`training.py`)."""

from .checkpoint import full_state_dict, load_expert_parallel, save_expert_parallel
from .expert_parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    fully_shard_around_experts,
    gather_experts,
)

__all__ = [
    "ExpertParallelExperts",
    "apply_expert_parallel",
    "full_state_dict",
    "fully_shard_around_experts",
    "gather_experts",
    "load_expert_parallel",
    "save_expert_parallel",
]
