"""Routed experts for inference on decode-sized batches and under torch.compile: static shapes, no host reads.

Two ways, both combining the experts' outputs with the routing weights as the sorted path does:
- dense: every expert on every token as two batched GEMMs, the routing weights (zero for the experts a token did
  not choose) combining them. At decode a batch of B tokens choosing k of E experts touches nearly every expert
  once B * k >= 2E (86% of them), with a handful of rows each: the grouped GEMM then streams every expert's weights
  through tiles that are almost all padding, where batched GEMMs over all E experts with B rows each read the same
  weights once, at the bandwidth plain GEMMs reach. Used on CUDA for at most `MAX_TOKENS` tokens (beyond that the
  extra FLOPs of computing unchosen experts stop being free), and under torch.compile without the grouped GEMM.
- matrix-vector kernels (`kernels/moe_gemv.py`): for up to 32 token-expert pairs in bf16 on CUDA (batch 1-5 at
  top-6), eager or compiled, two Triton kernels that read only the chosen experts' weights, once; the shared
  MLP's slices go in the same two launches as more pairs (`routed_and_shared_experts`, up to 32 pairs with them;
  FP8 experts with an FP8 shared MLP likewise; HF_DEEPSEEK_FOLD_SHARED_EXPERTS=0 gives the shared MLP launches of
  its own).
- expert-grouped kernels (`kernels/moe_grouped_gemv.py`; HF_DEEPSEEK_MOE_GROUPED_GEMV=0 turns them off): beyond 32
  pairs in bf16 on CUDA, in place of the dense and grouped-GEMM paths, two Triton kernels that read each chosen
  expert's weights once for all of its pairs.
- gathered: for the few tokens of a small decode batch under torch.compile without the grouped GEMM (fp32, CPU),
  each token-choice pair's expert weights gathered and applied by batched vector-matrix products: only the chosen
  experts are computed (as vLLM's fused MoE reads only them), in the (token, choice) order of the eager path.
The sorted per-expert loop reads each expert's row count on the host, which under torch.compile breaks the graph
and recompiles whenever another set of experts gets no rows: these keep the compiled decode step one graph.
"""

from collections.abc import Callable

import torch

from ..kernels import moe_gemv, moe_grouped_gemv
from .input_checks import tracing

DENSE_DECODE = True  # the decode benchmark turns it off to measure the grouped GEMM in the same run
MAX_TOKENS = 128


def use_dense_experts(experts, x: torch.Tensor, top_k: int) -> bool:
    """Whether `experts` (a RoutedExperts) should run all experts densely on these x [N, d] tokens on CUDA."""
    num_tokens = x.shape[0]
    return (
        DENSE_DECODE
        and x.is_cuda
        and not torch.is_grad_enabled()
        and num_tokens <= MAX_TOKENS
        and num_tokens * top_k >= 2 * experts.num_experts
    )


def decode_experts(experts, x: torch.Tensor, top_k: int, grouped_gemm: bool) -> Callable | None:
    """`dense_experts`, `gathered_experts` or None (the sorted path) for x [N, d] routed to `top_k` experts each;
    `grouped_gemm`: whether the fast grouped GEMM serves these tokens (bf16 CUDA), which keeps shapes static too."""
    if moe_grouped_gemv.usable(experts, x, x.shape[0] * top_k):  # opt-in: beyond MAX_PAIRS, in place of the others
        return grouped_gemv_experts
    if use_dense_experts(experts, x, top_k):
        return dense_experts
    if moe_gemv.usable(experts, x, x.shape[0] * top_k):  # a few bf16 tokens on CUDA: only the chosen experts read
        return gemv_experts
    if torch.is_grad_enabled() or grouped_gemm or not tracing():
        return None
    # gathering copies each pair's weights once (write and read again): worth it while 3 * N * k <= E
    return gathered_experts if 3 * x.shape[0] * top_k <= experts.num_experts else dense_experts


def gemv_experts(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [N, d], indices/weights [N, k] -> [N, d] through `kernels/moe_gemv.py` (Triton on CUDA)."""
    return moe_gemv.summed_over_top_k(
        moe_gemv.routed_experts_gemv, x, indices, weights, experts.gate_up_proj, experts.down_proj
    )


def routed_and_shared_experts(
    moe, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor | None:
    """A DeepSeekMoE layer's routed experts' sum plus its shared MLP's output for x [N, d], both in the two launches
    of `moe_gemv.routed_and_shared_experts_gemv`, where `moe_gemv.FOLD_SHARED` (default) and the matrix-vector
    kernels would serve the routed experts and the shared MLP's slices too (a SwiGLU without biases in the
    experts' dtype, its width a multiple of the experts'); None otherwise (the caller computes them apart)."""
    experts, shared = moe.experts, moe.shared_experts
    if not moe_gemv.FOLD_SHARED or moe_gemv.SUM_TOP_K or shared is None or not moe_gemv.is_silu(shared.act_fn):
        return None
    layers = (shared.gate_proj, shared.up_proj, shared.down_proj)
    if experts.gate_up_proj.dtype == torch.float8_e4m3fn:
        return fp8_routed_and_shared_experts(experts, layers, x, indices, weights)
    inter = experts.down_proj.shape[-1]
    if any(getattr(m, "bias", None) is not None or m.weight.dtype != experts.gate_up_proj.dtype for m in layers):
        return None
    slices, remainder = divmod(shared.gate_proj.out_features, inter)
    top_k = indices.shape[1]
    if remainder or decode_experts(experts, x, top_k, False) is not gemv_experts:
        return None
    if not moe_gemv.usable(experts, x, x.shape[0] * (top_k + slices)):
        return None
    weights_of = (m.weight for m in layers)
    op = moe_gemv.routed_and_shared_experts_gemv
    return op(x, indices, weights, experts.gate_up_proj, experts.down_proj, *weights_of).sum(dim=1).to(x.dtype)


def fp8_routed_and_shared_experts(experts, layers, x, indices, weights) -> torch.Tensor | None:
    """`routed_and_shared_experts` for FP8 experts (an FP8InferenceExperts) whose shared MLP's gate, up and down
    layers (`layers`) are FP8 too (FP8InferenceLinear, no bias): `moe_gemv.routed_and_shared_experts_gemv_fp8`
    where weight-only decoding and the FP8 matrix-vector kernels would serve the routed experts and the shared
    slices, the experts' width a multiple of 128 (each slice on whole scale blocks); None otherwise."""
    inter = experts.down_proj.shape[-1]
    fp8 = all(
        getattr(m, "weight_scale_inv", None) is not None and m.weight.dtype == torch.float8_e4m3fn and m.bias is None
        for m in layers
    )
    if not fp8 or not experts.fp8_recipe.weight_only_decode or inter % 128:
        return None
    slices, remainder = divmod(layers[0].out_features, inter)
    if remainder or not moe_gemv.usable_fp8(experts, x, x.shape[0] * (indices.shape[1] + slices)):
        return None
    shared = [t for m in layers for t in (m.weight, m.weight_scale_inv)]
    op = moe_gemv.routed_and_shared_experts_gemv_fp8
    return op(x, indices, weights, *experts._fp8_tensors(), *shared).sum(dim=1).to(x.dtype)


def grouped_gemv_experts(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [N, d], indices/weights [N, k] -> [N, d] through `kernels/moe_grouped_gemv.py` (Triton on CUDA)."""
    op = moe_grouped_gemv.routed_experts_grouped_gemv
    return moe_gemv.summed_over_top_k(op, x, indices, weights, experts.gate_up_proj, experts.down_proj)


def dense_experts(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [N, d], indices/weights [N, k] -> sum_k weight_k * expert_k(x) [N, d], computing every expert."""
    h = torch.matmul(x.unsqueeze(0), experts.gate_up_proj.transpose(1, 2))  # [E, N, 2I]
    gate, up = h.chunk(2, dim=-1)
    out = torch.matmul(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2))  # [E, N, d]
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=out.dtype, device=x.device)
    combine.scatter_(1, indices, weights.to(out.dtype))  # [N, E]: the routing weight, 0 where not chosen
    return torch.einsum("end,ne->nd", out, combine).to(x.dtype)


def gathered_experts(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [N, d], indices/weights [N, k] -> sum_k weight_k * expert_k(x) [N, d], computing only the chosen experts."""
    num_tokens, top_k = indices.shape
    chosen = indices.flatten()  # [N*k]: token-major, as the eager path's (token, choice) order
    rows = x.repeat_interleave(top_k, dim=0).unsqueeze(1)  # [N*k, 1, d]
    h = torch.bmm(rows, experts.gate_up_proj[chosen].transpose(1, 2))  # [N*k, 1, 2I]
    gate, up = h.chunk(2, dim=-1)
    out = torch.bmm(experts.act_fn(gate) * up, experts.down_proj[chosen].transpose(1, 2))  # [N*k, 1, d]
    out = out.view(num_tokens, top_k, -1)
    return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(x.dtype)


__all__ = [
    "use_dense_experts", "decode_experts", "dense_experts", "gathered_experts", "gemv_experts", "grouped_gemv_experts",
    "routed_and_shared_experts", "fp8_routed_and_shared_experts",
    "DENSE_DECODE", "MAX_TOKENS",
]  # fmt: skip
