"""Parallelism applied to a built model from outside the network (torchtitan's rule): expert parallelism today."""

from .expert_parallel import ExpertParallelExperts, apply_expert_parallel

__all__ = ["ExpertParallelExperts", "apply_expert_parallel"]
