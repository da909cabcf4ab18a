"""Routed experts for decode-sized batches: every expert on every token as two batched GEMMs, then the routing
weights (zero for the experts a token did not choose) combine them.

At decode a batch of B tokens choosing k of E experts touches nearly every expert once B * k >= 2E (86% of them),
with a handful of rows each: the grouped GEMM then streams every expert's weights through tiles that are almost
all padding. Batched GEMMs over all E experts with B rows each read the same weights once, at the bandwidth that
plain GEMMs reach, and have static shapes (CUDA-graph friendly). Used only without autograd, on CUDA, for at most
`MAX_TOKENS` tokens (beyond that the extra FLOPs of computing unchosen experts stop being free).
"""

import torch

DENSE_DECODE = True  # the decode benchmark turns it off to measure the grouped GEMM in the same run
MAX_TOKENS = 128


def use_dense_experts(experts, x: torch.Tensor, top_k: int) -> bool:
    """Whether `experts` (a RoutedExperts) should run all experts densely on these x [N, d] tokens."""
    num_tokens = x.shape[0]
    return (
        DENSE_DECODE
        and x.is_cuda
        and not torch.is_grad_enabled()
        and num_tokens <= MAX_TOKENS
        and num_tokens * top_k >= 2 * experts.num_experts
    )


def dense_experts(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [N, d], indices/weights [N, k] -> sum_k weight_k * expert_k(x) [N, d], computing every expert."""
    h = torch.matmul(x.unsqueeze(0), experts.gate_up_proj.transpose(1, 2))  # [E, N, 2I]
    gate, up = h.chunk(2, dim=-1)
    out = torch.matmul(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2))  # [E, N, d]
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=out.dtype, device=x.device)
    combine.scatter_(1, indices, weights.to(out.dtype))  # [N, E]: the routing weight, 0 where not chosen
    return torch.einsum("end,ne->nd", out, combine).to(x.dtype)


__all__ = ["use_dense_experts", "dense_experts", "DENSE_DECODE", "MAX_TOKENS"]
