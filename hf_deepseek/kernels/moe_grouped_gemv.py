"""Routed experts for decode batches beyond the matrix-vector kernels' `MAX_PAIRS`: two Triton kernels grouped by
expert, which read each active expert's weights once per step for all of its token-expert pairs.

At batch 32 a DeepSeek MoE layer with top-6 of 64 experts computes 192 pairs. The per-pair kernels of `moe_gemv.py`
would read an expert's weights once per pair; torch's grouped GEMM pads every expert to a 64- or 128-row tile; the
dense path computes all 64 experts for every token; and FP8 experts (`FP8InferenceExperts`) went through the FP8
GEMM path, dequantising every expert's weights each step (an FP8 step at batch 32 took 4.24 ms on an H200 against
bf16's 3.32). Here the pairs are sorted by expert on the device (one launch, in `moe_routing.sort_pairs`'s order)
and each program streams a block of one expert's rows against all of that expert's token rows
(`_moe_grouped_gemv_triton.py`): one read of the weights a step, half the bytes with FP8 weights, dequantised in
registers.

`routed_experts_grouped_gemv` (bf16) and `routed_experts_grouped_gemv_fp8` are custom ops (one node under
torch.compile, captured by CUDA graphs: no host read, static shapes): the Triton kernels on CUDA, `moe_gemv.reference`
elsewhere, the same computation (what the CPU tests run). FP8 experts take them by default between `MAX_PAIRS` and
`MAX_GROUPED_PAIRS` pairs (`usable_fp8`), and so do bf16 experts (`usable`) unless HF_DEEPSEEK_MOE_GROUPED_GEMV=0
(read at import): at batch 32 / 2k the bench's step took 3.07 ms through them against 3.25 through the grouped GEMM
of `modeling/moe_decode.py` (H200, docs/PERF.md, 2026-12-05). `benchmarks/moe_gemv_tune.py --grouped-kernels` times
them against torch's grouped GEMM.
"""

import os

import torch

from . import moe_gemv

MAX_GROUPED_PAIRS = 1024  # token-expert pairs up to which the grouped kernels serve (batch 170 at top-6)
GROUPED_GEMV = os.environ.get("HF_DEEPSEEK_MOE_GROUPED_GEMV", "1") != "0"  # bf16 experts too (default on)


def usable(experts, x: torch.Tensor, pairs: int) -> bool:
    """Whether `routed_experts_grouped_gemv` serves bf16 `experts` (a RoutedExperts) for x [N, d] with `pairs`
    pairs: unless HF_DEEPSEEK_MOE_GROUPED_GEMV=0, beyond the matrix-vector kernels' pairs, on their other conditions."""
    return GROUPED_GEMV and moe_gemv.MAX_PAIRS < pairs <= MAX_GROUPED_PAIRS and moe_gemv.usable(experts, x, 1)


def usable_fp8(experts, x: torch.Tensor, pairs: int) -> bool:
    """Whether `routed_experts_grouped_gemv_fp8` serves FP8 `experts` (an FP8InferenceExperts) for x [N, d]: where
    `moe_gemv.usable_fp8` fails only for more than `MAX_PAIRS` pairs."""
    return moe_gemv.MAX_PAIRS < pairs <= MAX_GROUPED_PAIRS and moe_gemv.usable_fp8(experts, x, 1)


@torch.library.custom_op("hf_deepseek::routed_experts_grouped_gemv", mutates_args=())
def routed_experts_grouped_gemv(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    per_pair: bool = False,
) -> torch.Tensor:
    """`moe_gemv.routed_experts_gemv`'s computation (x [N, d], indices/weights [N, k], gate_up [E, 2I, d], down
    [E, d, I] -> [N, d]; `per_pair`: fp32 [N, k, d] unsummed) by the expert-grouped kernels on CUDA."""
    if not x.is_cuda:
        return moe_gemv.reference(x, indices, weights, gate_up, down, per_pair=per_pair)
    from ._moe_grouped_gemv_triton import launch

    return launch(x, indices, weights, gate_up, down, per_pair=per_pair)


@routed_experts_grouped_gemv.register_fake
def _(x, indices, weights, gate_up, down, per_pair=False):
    return moe_gemv.fake_output(x, indices, per_pair)


@torch.library.custom_op("hf_deepseek::routed_experts_grouped_gemv_fp8", mutates_args=())
def routed_experts_grouped_gemv_fp8(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    per_pair: bool = False,
) -> torch.Tensor:
    """`moe_gemv.routed_experts_gemv_fp8`'s computation (FP8 weights and their 128x128 block scales, the activation
    kept in x's dtype) by the expert-grouped kernels on CUDA."""
    if not x.is_cuda:
        return moe_gemv.reference_fp8(x, indices, weights, gate_up, gate_up_scale, down, down_scale, per_pair)
    from ._moe_grouped_gemv_triton import launch

    scales = dict(gate_up_scale=gate_up_scale, down_scale=down_scale)
    return launch(x, indices, weights, gate_up, down, **scales, per_pair=per_pair)


@routed_experts_grouped_gemv_fp8.register_fake
def _(x, indices, weights, gate_up, gate_up_scale, down, down_scale, per_pair=False):
    return moe_gemv.fake_output(x, indices, per_pair)


__all__ = [
    "routed_experts_grouped_gemv", "routed_experts_grouped_gemv_fp8", "usable", "usable_fp8", "MAX_GROUPED_PAIRS",
    "GROUPED_GEMV",
]  # fmt: skip
