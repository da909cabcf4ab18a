"""Routed experts for a few decode tokens as two Triton matrix-vector kernels that read only the chosen experts'
weights, once (as vLLM's fused MoE does for small batches).

At batch 1 a DeepSeek MoE layer computes k token-expert pairs of one row each. torch's grouped GEMM pads every pair
to a 64- or 128-row tile and, with its set-up kernels (sort, offsets, gathers), took twice the weights' read time on
an H200 (0.40 ms of a 1.9 ms step, `docs/decode-h200/`). Here each program streams a block of one chosen expert's
rows against the token's vector: the gate and up rows together, SiLU(gate) * up written once (kernel 1), then the
down projection scaled by the routing weight (kernel 2); the k results per token are summed in torch.

`routed_experts_gemv` is a custom op (one node under torch.compile, captured by CUDA graphs): the Triton kernels on
CUDA, the same computation in torch elsewhere (`reference`), which is what the CPU tests run.
`routed_experts_gemv_fp8` is the same for FP8 weights with DeepSeek's 128x128 block scales (a checkpoint kept in
FP8, `FP8InferenceExperts`): each weight dequantised in registers, so a step reads half the bytes of bf16's;
`linear_gemv_fp8` applies the same kernel to an FP8 linear layer's few decode rows (`FP8InferenceLinear`);
`linear_gemv` to a bf16 one's single decode row (`modeling/decode_linear.py`; on an H200 a batch-1 step's dense
layers took 232 us through it against cuBLAS's 330, `benchmarks/moe_gemv_tune.py --linear`; HF_DEEPSEEK_LINEAR_GEMV=0
keeps cuBLAS); `gate_up_gemv` runs a SwiGLU MLP's gate and up projections of that row in one launch, the activation
applied in it (default; HF_DEEPSEEK_FUSED_GATE_UP=0 turns it off; `gate_up_gemv_fp8` for FP8 ones), and
`linear_gemv_pair` two linear layers of one input, MLA's q_a and kv_a projections (default;
HF_DEEPSEEK_FUSED_Q_KV_A=0 turns it off; `linear_gemv_pair_fp8` for FP8 ones); `norm_linear_gemv` an RMSNorm and
the linear layer after it, MLA's q_a norm and q_b projection (default, HF_DEEPSEEK_FUSED_NORM_LINEAR=0 turns it off;
`norm_linear_gemv_fp8` for an FP8 q_b);
`norm_linear_gemv_pair` a decoder layer's input norm with q_a and kv_a (HF_DEEPSEEK_FUSED_INPUT_NORM=0 turns it off);
`routed_and_shared_experts_gemv` adds a MoE layer's shared MLP to the routed experts' two launches as more pairs
(default; HF_DEEPSEEK_FOLD_SHARED_EXPERTS=0 turns it off); HF_DEEPSEEK_FUSED_EXPERTS=1 runs a MoE layer's two
launches as one.
"""

import os

import torch
import torch.nn.functional as F

from .fp8_blocks import dequantize_blocks, dequantize_experts
from .moe_gemv_config import kernel_config, split_chunk

ENABLED = True  # the decode benchmark turns it off to measure torch's grouped GEMM in the same run
MAX_PAIRS = 32  # token-expert pairs up to which the kernels replace the grouped GEMM (batch 1-5 at top-6)
MAX_LINEAR_ROWS = 4  # rows up to which an FP8 linear layer runs as matrix-vector products (each row reads the weight)
MAX_BF16_LINEAR_ROWS = 1  # a bf16 one's: measured faster than cuBLAS at one row; cuBLAS above
LINEAR_GEMV = os.environ.get("HF_DEEPSEEK_LINEAR_GEMV", "1") != "0"  # bf16 dense layers' decode rows too
# the down kernel sums each token's top-k itself (no torch sum and conversion after it): opt-in, 3% slower than the
# default in a batch-1 step on an H200 (bench row `ours-fast-sum-top-k`, docs/PERF.md 2026-12-04h)
SUM_TOP_K = os.environ.get("HF_DEEPSEEK_MOE_GEMV_SUM_TOP_K", "0") == "1"
# a SwiGLU MLP's gate and up projections of one decode row (FP8 layers: up to MAX_LINEAR_ROWS rows) in one launch,
# SiLU(gate) * up applied in it (two launches fewer a layer: the up projection and the activation): on by default
# with the other launch-saving kernels (FUSED_NORM_LINEAR's note below; FP8 layers since 2026-12-06, not yet timed:
# bench row ours-fast-fp8-head-separate-gate-up keeps them apart); HF_DEEPSEEK_FUSED_GATE_UP=0 turns it off
FUSED_GATE_UP = os.environ.get("HF_DEEPSEEK_FUSED_GATE_UP", "1") != "0"
# MLA's q_a and kv_a projections of one decode row (two linear layers of one input) in one launch: on by default,
# its batch-1 step 1.12 ms against 1.16 with the steps replayed from hand-captured graphs (bench row
# ours-fast-q-kv-a, H100, docs/PERF.md 2026-12-05f; the earlier 1.15 against 1.13 on an H200 was timed through
# Inductor's graphs, host time included); HF_DEEPSEEK_FUSED_Q_KV_A=0 turns it off
FUSED_Q_KV_A = os.environ.get("HF_DEEPSEEK_FUSED_Q_KV_A", "1") != "0"
# MLA's q_a norm computed by the q_b projection's launch (each program recomputes the row's norm): on by default;
# HF_DEEPSEEK_FUSED_NORM_LINEAR=0 turns it off. With the MLA front, the fused attention epilogue, the fused gate/up
# and the router's add+norm (the launch-saving kernels, all on by default) a batch-1 / 2k step took 1.01 ms against
# 1.12 with all of them off, FP8 0.89 against 0.98, batch 32 / 2k 3.96 against 4.01 (bench rows
# ours-fast-fewest-launches-router-norm, ours-fast-fp8-fewest-launches, ours-fast, H100, docs/PERF.md 2026-12-06)
FUSED_NORM_LINEAR = os.environ.get("HF_DEEPSEEK_FUSED_NORM_LINEAR", "1") != "0"
# a decoder layer's input RMSNorm computed by its q_a/kv_a pair launch (`norm_linear_gemv_pair`; each program
# recomputes the row's norm), so that the residual sum before it joins the MoE layer's top-k sum in one Inductor
# kernel: a launch fewer a layer. On by default: a batch-1 / 2k step 0.979 against 0.988 ms, FP8 with its head in
# FP8 0.686 against 0.696 (rows ours-fast-input-norm and ours-fast, H100, docs/PERF.md 2026-12-06);
# HF_DEEPSEEK_FUSED_INPUT_NORM=0 turns it off
FUSED_INPUT_NORM = os.environ.get("HF_DEEPSEEK_FUSED_INPUT_NORM", "1") != "0"
# a MoE layer's shared experts as more pairs of the routed experts' two launches (`routed_and_shared_experts_gemv`:
# their own gate, up, activation and down launches gone): on by default, its batch-1 step 1.16 ms against 1.63
# without it (bench rows ours-fast-fold-shared and ours-fast, H100, docs/PERF.md 2026-12-05);
# HF_DEEPSEEK_FOLD_SHARED_EXPERTS=0 turns it off
FOLD_SHARED = os.environ.get("HF_DEEPSEEK_FOLD_SHARED_EXPERTS", "1") != "0"
# a MoE layer's gate/up and down matrix-vector kernels as one launch of persistent programs, each pair's down blocks
# waiting on counters for its activation (`_moe_gemv_triton._experts_kernel`: one launch ramp a layer fewer, and the
# down blocks' weight lines asked of L2 before they wait): opt-in, measured slower (a batch-1 / 2k step 0.767 against
# 0.686 ms with FP8 weights, 1.007 against 0.989 bf16; bench rows ours-fast-fp8-head-fused-experts and
# ours-fast-fused-experts, H100, docs/PERF.md 2026-12-06); HF_DEEPSEEK_FUSED_EXPERTS=1 turns it on
FUSED_EXPERTS = os.environ.get("HF_DEEPSEEK_FUSED_EXPERTS", "0") == "1"


_TRITON: bool | None = None  # whether Triton imports and CUDA exists: found once, by the first call


# Both probes run as plain Python calls whose result Dynamo takes as a constant: traced, their first call (a compiled
# training step's first MoE block) would guard on the global being None, which the call itself changes, and the
# block's next call would recompile (H100, 2026-12-06)
@torch._dynamo.assume_constant_result
def triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = torch.cuda.is_available()
        except ImportError:
            _TRITON = False
    return _TRITON


_FP8: bool | None = None  # whether the GPU converts FP8 in Triton (compute capability 8.9+): found once, eagerly


@torch._dynamo.assume_constant_result
def fp8_kernels_available() -> bool:
    global _FP8
    if _FP8 is None:
        _FP8 = triton_available() and torch.cuda.get_device_capability() >= (8, 9)
    return _FP8


def is_silu(act_fn) -> bool:
    """Whether an activation module or function is SiLU (what the kernels apply in registers)."""
    return getattr(act_fn, "__name__", type(act_fn).__name__).lower() in ("silu", "siluactivation")


def decode_rows(x2, weight, x_dtypes: tuple, weight_dtype: torch.dtype, fp8: bool, lo: int, hi: int) -> bool:
    """The decode kernels' common conditions on the rows x2 [T, K] of a linear layer (set-up time checks): kernels
    enabled, CUDA with Triton (and FP8 conversions with `fp8`), the dtypes, no grad mode, lo < T <= hi."""
    available = fp8_kernels_available if fp8 else triton_available
    return (
        ENABLED
        and x2.is_cuda
        and available()
        and x2.dtype in x_dtypes
        and weight.dtype == weight_dtype
        and not torch.is_grad_enabled()
        and lo < x2.shape[0] <= hi
    )


def fp8_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ W^T in fp32, rounded once to x's dtype, W the FP8 weight [N, K] dequantised exactly by its 128x128
    block scales: the FP8 linear kernels' computation in torch (their CPU path)."""
    return (x.float() @ dequantize_blocks(weight, scale).T).to(x.dtype)


def usable(experts, x: torch.Tensor, pairs: int) -> bool:
    """Whether `routed_experts_gemv` serves x [N, d] with `pairs` token-expert pairs (set-up time checks only)."""
    silu = is_silu(experts.act_fn)
    return (
        ENABLED
        and x.is_cuda
        and triton_available()  # first: an eager forward (the prefill) settles it before any compiled step
        and x.dtype == torch.bfloat16
        and experts.gate_up_proj.dtype == torch.bfloat16
        and not torch.is_grad_enabled()
        and pairs <= MAX_PAIRS
        and silu
    )


def reference(
    x, indices, weights, gate_up, down, act_dtype: torch.dtype | None = None, per_pair: bool = False
) -> torch.Tensor:
    """x [N, d], indices/weights [N, k], gate_up [E, 2I, d], down [E, d, I] -> [N, d]: the kernels' computation in
    torch (fp32 accumulation, the activation rounded to `act_dtype`, by default the weights' dtype, as the kernel
    stores it). `per_pair`: each pair's weighted product, fp32 [N, k, d], unsummed."""
    num_tokens, top_k = indices.shape
    inter = down.shape[-1]
    chosen = indices.flatten()
    rows = x.repeat_interleave(top_k, dim=0).float()  # [P, d]
    h = torch.einsum("pd,pnd->pn", rows, gate_up[chosen].float())  # [P, 2I]
    act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(act_dtype or gate_up.dtype).float()
    out = torch.einsum("pi,pdi->pd", act, down[chosen].float()) * weights.flatten()[:, None].float()
    out = out.view(num_tokens, top_k, -1)
    return out if per_pair else out.sum(dim=1).to(x.dtype)


def shared_as_experts(gate, up, down, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared SwiGLU MLP (gate and up [S I, d], down [d, S I]) as S experts of width I in the routed layout
    (gate_up [S, 2I, d], down [S, d, I]): the MLP's output is the sum of theirs, each intermediate unit belonging to
    one slice."""
    slices, dim = gate.shape[0] // inter, gate.shape[1]
    gate_up = torch.cat([gate.view(slices, inter, dim), up.view(slices, inter, dim)], dim=1)
    return gate_up, down.view(dim, slices, inter).transpose(0, 1)


def reference_with_shared(
    x, indices, weights, gate_up, down, shared_gate, shared_up, shared_down, act_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`routed_and_shared_experts_gemv`'s computation in torch: the routed pairs' weighted products, then the shared
    MLP's slices' (weight 1), fp32 [N, k + S, d]; the activation rounded to `act_dtype` (default: the weights')."""
    routed = reference(x, indices, weights, gate_up, down, act_dtype=act_dtype, per_pair=True)
    shared_gate_up, shared_down = shared_as_experts(shared_gate, shared_up, shared_down, down.shape[-1])
    slices = shared_gate_up.shape[0]
    every = torch.arange(slices, device=x.device).expand(x.shape[0], slices)
    ones = torch.ones(x.shape[0], slices, device=x.device)
    shared = reference(x, every, ones, shared_gate_up, shared_down, act_dtype=act_dtype, per_pair=True)
    return torch.cat([routed, shared], dim=1)


def reference_fp8(x, indices, weights, gate_up, gate_up_scale, down, down_scale, per_pair=False) -> torch.Tensor:
    """`reference` for FP8 weights with their 128x128 block scales, dequantised exactly; the activation kept in
    x's dtype, as the FP8 kernels store it."""
    full = dequantize_experts(gate_up, gate_up_scale, down, down_scale)
    return reference(x, indices, weights, *full, act_dtype=x.dtype, per_pair=per_pair)


def usable_fp8(experts, x: torch.Tensor, pairs: int) -> bool:
    """Whether `routed_experts_gemv_fp8` serves FP8 `experts` (an FP8InferenceExperts) for x [N, d]."""
    silu = is_silu(experts.act_fn)
    return (
        ENABLED
        and x.is_cuda
        and fp8_kernels_available()
        and x.dtype in (torch.bfloat16, torch.float16)
        and experts.gate_up_proj.dtype == torch.float8_e4m3fn
        and not torch.is_grad_enabled()
        and pairs <= MAX_PAIRS
        and silu
    )


@torch.library.custom_op("hf_deepseek::routed_experts_gemv", mutates_args=())
def routed_experts_gemv(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    per_pair: bool = False,
) -> torch.Tensor:
    """x [N, d] bf16, indices/weights [N, k], gate_up [E, 2I, d], down [E, d, I] (bf16, contiguous) -> [N, d]:
    sum_k weights[:, k] * down[e_k] @ (SiLU(gate[e_k] @ x) * (up[e_k] @ x)). `per_pair`: the k weighted products
    unsummed, fp32 [N, k, d] (`summed_over_top_k` sums them in the caller's graph; under a split-K configuration on
    CUDA each product as its partial sums, [N, `output_slots`, d])."""
    if not x.is_cuda:
        return reference(x, indices, weights, gate_up, down, per_pair=per_pair)
    from ._moe_gemv_triton import launch

    return launch(
        x, indices, weights, gate_up, down, sum_top_k=SUM_TOP_K and not per_pair, per_pair=per_pair, fused=FUSED_EXPERTS
    )


def output_slots(x: torch.Tensor, pairs_per_token: int, inter: int, fp8: bool) -> int:
    """Slots per token of the matrix-vector ops' per-pair output for x: its pairs, on CUDA under a split-K
    configuration of the down kernel each pair's partial sums over its chunks of I (`_moe_gemv_triton.launch`)."""
    cfg = kernel_config(None, fp8=fp8, down=True)
    if x.device.type != "cuda" or cfg.split_k == 1:
        return pairs_per_token
    return pairs_per_token * -(-inter // split_chunk(inter, cfg.split_k, cfg.block_k))


def fake_output(x: torch.Tensor, indices: torch.Tensor, per_pair: bool, slots: int | None = None) -> torch.Tensor:
    """The routed-expert ops' output under tracing: [N, d] like x, or with `per_pair` fp32 [N, slots, d] (by
    default the k pairs)."""
    if per_pair:
        return x.new_empty(indices.shape[0], slots or indices.shape[1], x.shape[-1], dtype=torch.float32)
    return torch.empty_like(x)


@routed_experts_gemv.register_fake
def _(x, indices, weights, gate_up, down, per_pair=False):
    return fake_output(x, indices, per_pair, output_slots(x, indices.shape[1], down.shape[-1], False))


@torch.library.custom_op("hf_deepseek::routed_and_shared_experts_gemv", mutates_args=())
def routed_and_shared_experts_gemv(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    shared_gate: torch.Tensor,
    shared_up: torch.Tensor,
    shared_down: torch.Tensor,
) -> torch.Tensor:
    """`routed_experts_gemv` with per-pair output and a MoE layer's shared MLP (gate and up [S I, d], down [d, S I],
    bf16) as S more pairs of each token after its k routed ones, its slices of width I weighted 1: fp32 [N, k + S, d],
    whose sum over dim 1 is the routed experts' sum plus the shared MLP's output, in the same two launches."""
    if not x.is_cuda:
        return reference_with_shared(x, indices, weights, gate_up, down, shared_gate, shared_up, shared_down)
    from ._moe_gemv_triton import launch

    shared = (shared_gate, shared_up, shared_down)
    return launch(x, indices, weights, gate_up, down, per_pair=True, shared=shared, fused=FUSED_EXPERTS)


def fake_folded_output(x, indices, shared_gate, down, fp8: bool) -> torch.Tensor:
    """The fold ops' output under tracing: fp32 [N, slots, d], the slots those of the k routed pairs and the shared
    MLP's slices (`output_slots`)."""
    pairs = indices.shape[1] + shared_gate.shape[0] // down.shape[-1]
    return fake_output(x, indices, True, output_slots(x, pairs, down.shape[-1], fp8))


@routed_and_shared_experts_gemv.register_fake
def _(x, indices, weights, gate_up, down, shared_gate, shared_up, shared_down):
    return fake_folded_output(x, indices, shared_gate, down, False)


def summed_over_top_k(op, x: torch.Tensor, indices: torch.Tensor, *args) -> torch.Tensor:
    """`op` (a routed-expert op of this module or `moe_grouped_gemv`) on x [N, d] and its routing: each token's sum over
    its top-k, in x's dtype. The op returns the per-pair products and the sum is taken here, in the caller's graph,
    where Inductor unrolls a sum over k <= 8 and fuses it, with its rounding, into the kernel that reads the MoE
    output next (the residual add and the next norm): two launches fewer a MoE layer than a sum and a conversion
    after the kernels. With SUM_TOP_K the matrix-vector down kernel sums instead (the grouped ops then sum in the op).
    """
    if SUM_TOP_K:
        return op(x, indices, *args)
    return op(x, indices, *args, per_pair=True).sum(dim=1).to(x.dtype)


def usable_linear_fp8(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_gemv_fp8` serves the rows x2 [T, K] of an FP8 linear layer."""
    half = (torch.bfloat16, torch.float16)
    return decode_rows(x2, weight, half, torch.float8_e4m3fn, True, 0, MAX_LINEAR_ROWS)


def usable_linear(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_gemv` serves the rows x2 [T, K] of a bf16 linear layer (not with HF_DEEPSEEK_LINEAR_GEMV=0)."""
    return LINEAR_GEMV and decode_rows(x2, weight, (torch.bfloat16,), torch.bfloat16, False, 0, MAX_BF16_LINEAR_ROWS)


@torch.library.custom_op("hf_deepseek::linear_gemv", mutates_args=())
def linear_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T -> [T, N] (bf16 weight, fp32 accumulation): the matrix-vector kernel on CUDA."""
    if not x.is_cuda:
        return F.linear(x, weight)
    from ._moe_gemv_triton import launch_linear

    return launch_linear(x, weight)


@linear_gemv.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("hf_deepseek::gate_up_gemv", mutates_args=())
def gate_up_gemv(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """x [T, K], gate and up [I, K] (bf16) -> SiLU(x @ gate^T) * (x @ up^T) [T, I] in x's dtype, both products
    accumulated in fp32 and the activation rounded once: the gate/up kernel on CUDA."""
    if not x.is_cuda:
        return (F.silu(F.linear(x.float(), gate.float())) * F.linear(x.float(), up.float())).to(x.dtype)
    from ._moe_gemv_triton import launch_gate_up

    return launch_gate_up(x, gate, up)


@gate_up_gemv.register_fake
def _(x, gate, up):
    return x.new_empty(x.shape[0], gate.shape[0])


@torch.library.custom_op("hf_deepseek::gate_up_gemv_fp8", mutates_args=())
def gate_up_gemv_fp8(
    x: torch.Tensor, gate: torch.Tensor, gate_scale: torch.Tensor, up: torch.Tensor, up_scale: torch.Tensor
) -> torch.Tensor:
    """`gate_up_gemv` for a SwiGLU MLP's two FP8 layers [I, K] with their 128x128 block scales: both products of
    the weights dequantised exactly, accumulated in fp32, the activation rounded once to x's dtype; one launch of
    the gate/up kernel on CUDA."""
    if not x.is_cuda:
        gate_out = x.float() @ dequantize_blocks(gate, gate_scale).T
        return (F.silu(gate_out) * (x.float() @ dequantize_blocks(up, up_scale).T)).to(x.dtype)
    from ._moe_gemv_triton import launch_gate_up

    return launch_gate_up(x, gate, up, gate_scale=gate_scale, up_scale=up_scale)


@gate_up_gemv_fp8.register_fake
def _(x, gate, gate_scale, up, up_scale):
    return x.new_empty(x.shape[0], gate.shape[0])


@torch.library.custom_op("hf_deepseek::linear_gemv_pair", mutates_args=())
def linear_gemv_pair(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """x [T, K], first [N1, K] and second [N2, K] (bf16) -> [x @ first^T, x @ second^T] joined [T, N1 + N2] in x's
    dtype (fp32 accumulation): one launch of the pair kernel on CUDA."""
    if not x.is_cuda:
        return torch.cat([F.linear(x, first), F.linear(x, second)], dim=-1)
    from ._moe_gemv_triton import launch_linear_pair

    return launch_linear_pair(x, first, second)


@linear_gemv_pair.register_fake
def _(x, first, second):
    return x.new_empty(x.shape[0], first.shape[0] + second.shape[0])


@torch.library.custom_op("hf_deepseek::linear_gemv_pair_fp8", mutates_args=())
def linear_gemv_pair_fp8(
    x: torch.Tensor, first: torch.Tensor, first_scale: torch.Tensor, second: torch.Tensor, second_scale: torch.Tensor
) -> torch.Tensor:
    """`linear_gemv_pair` for two FP8 linear layers [N1, K] and [N2, K] with their 128x128 block scales: each half
    as `linear_gemv_fp8` computes it, in one launch of the pair kernel on CUDA."""
    if not x.is_cuda:
        return torch.cat([fp8_product(x, first, first_scale), fp8_product(x, second, second_scale)], dim=-1)
    from ._moe_gemv_triton import launch_linear_pair

    return launch_linear_pair(x, first, second, first_scale=first_scale, second_scale=second_scale)


@linear_gemv_pair_fp8.register_fake
def _(x, first, first_scale, second, second_scale):
    return x.new_empty(x.shape[0], first.shape[0] + second.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm computed in fp32, as DeepSeek does, rounded to x's dtype, times the weight:
    `layers.RMSNorm`'s forward and the norm-prologue kernel's reference."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.library.custom_op("hf_deepseek::norm_linear_gemv", mutates_args=())
def norm_linear_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> RMSNorm(x) @ weight^T [T, N] in x's dtype (bf16 weight [N, K], the norm's weight [K]): one
    launch of the norm-prologue kernel on CUDA."""
    if not x.is_cuda:
        return F.linear(rms_norm(x, norm_weight, eps), weight)
    from ._moe_gemv_triton import launch_norm_linear

    return launch_norm_linear(x, norm_weight, eps, weight)


@norm_linear_gemv.register_fake
def _(x, norm_weight, eps, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("hf_deepseek::norm_linear_gemv_fp8", mutates_args=())
def norm_linear_gemv_fp8(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """`norm_linear_gemv` for an FP8 weight [N, K] and its 128x128 block scales [ceil(N/128), ceil(K/128)]: RMSNorm(x)
    times the dequantised weight in fp32, rounded once to x's dtype (`fp8_product`), in one launch on CUDA."""
    if not x.is_cuda:
        return fp8_product(rms_norm(x, norm_weight, eps), weight, scale)
    from ._moe_gemv_triton import launch_norm_linear

    return launch_norm_linear(x, norm_weight, eps, weight, scale=scale)


@norm_linear_gemv_fp8.register_fake
def _(x, norm_weight, eps, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("hf_deepseek::norm_linear_gemv_pair", mutates_args=())
def norm_linear_gemv_pair(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """`linear_gemv_pair` of RMSNorm(x) (`norm_linear_gemv`'s norm): [T, N1 + N2] in x's dtype, the norm and both
    products in one launch on CUDA."""
    if not x.is_cuda:
        normed = rms_norm(x, norm_weight, eps)
        return torch.cat([F.linear(normed, first), F.linear(normed, second)], dim=-1)
    from ._moe_gemv_triton import launch_norm_linear_pair

    return launch_norm_linear_pair(x, norm_weight, eps, first, second)


@norm_linear_gemv_pair.register_fake
def _(x, norm_weight, eps, first, second):
    return x.new_empty(x.shape[0], first.shape[0] + second.shape[0])


@torch.library.custom_op("hf_deepseek::norm_linear_gemv_pair_fp8", mutates_args=())
def norm_linear_gemv_pair_fp8(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    first: torch.Tensor,
    first_scale: torch.Tensor,
    second: torch.Tensor,
    second_scale: torch.Tensor,
) -> torch.Tensor:
    """`norm_linear_gemv_pair` for two FP8 layers with their 128x128 block scales (each half as
    `norm_linear_gemv_fp8` computes it)."""
    if not x.is_cuda:
        normed = rms_norm(x, norm_weight, eps)
        return torch.cat([fp8_product(normed, first, first_scale), fp8_product(normed, second, second_scale)], -1)
    from ._moe_gemv_triton import launch_norm_linear_pair

    return launch_norm_linear_pair(
        x, norm_weight, eps, first, second, first_scale=first_scale, second_scale=second_scale
    )


@norm_linear_gemv_pair_fp8.register_fake
def _(x, norm_weight, eps, first, first_scale, second, second_scale):
    return x.new_empty(x.shape[0], first.shape[0] + second.shape[0])


@torch.library.custom_op("hf_deepseek::linear_gemv_fp8", mutates_args=())
def linear_gemv_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ W^T -> [T, N] in x's dtype, W the FP8 weight [N, K] dequantised by its 128x128 block scales
    [ceil(N/128), ceil(K/128)] (fp32 accumulation)."""
    if not x.is_cuda:
        return fp8_product(x, weight, scale)
    from ._moe_gemv_triton import launch_linear_fp8

    return launch_linear_fp8(x, weight, scale)


@linear_gemv_fp8.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("hf_deepseek::routed_experts_gemv_fp8", mutates_args=())
def routed_experts_gemv_fp8(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    per_pair: bool = False,
) -> torch.Tensor:
    """`routed_experts_gemv` with FP8 weights: gate_up [E, 2I, d] and down [E, d, I] float8_e4m3fn, their block
    scales as `fp8_blocks.dequantize_experts` reads them; the activation kept in x's dtype."""
    if not x.is_cuda:
        return reference_fp8(x, indices, weights, gate_up, gate_up_scale, down, down_scale, per_pair)
    from ._moe_gemv_triton import launch

    return launch(
        x,
        indices,
        weights,
        gate_up,
        down,
        gate_up_scale=gate_up_scale,
        down_scale=down_scale,
        sum_top_k=SUM_TOP_K and not per_pair,
        per_pair=per_pair,
        fused=FUSED_EXPERTS,
    )


@routed_experts_gemv_fp8.register_fake
def _(x, indices, weights, gate_up, gate_up_scale, down, down_scale, per_pair=False):
    return fake_output(x, indices, per_pair, output_slots(x, indices.shape[1], down.shape[-1], True))


@torch.library.custom_op("hf_deepseek::routed_and_shared_experts_gemv_fp8", mutates_args=())
def routed_and_shared_experts_gemv_fp8(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    shared_gate: torch.Tensor,
    shared_gate_scale: torch.Tensor,
    shared_up: torch.Tensor,
    shared_up_scale: torch.Tensor,
    shared_down: torch.Tensor,
    shared_down_scale: torch.Tensor,
) -> torch.Tensor:
    """`routed_and_shared_experts_gemv` with FP8 weights, the routed experts' as `routed_experts_gemv_fp8` takes
    them and the shared MLP's three FP8 matrices with their 128x128 block scales (the experts' width I a multiple of
    128, so each slice's rows or columns start on a block): fp32 [N, k + S, d], the activation kept in x's dtype."""
    if not x.is_cuda:
        pairs = ((shared_gate, shared_gate_scale), (shared_up, shared_up_scale), (shared_down, shared_down_scale))
        shared = [dequantize_blocks(w, s) for w, s in pairs]
        full = dequantize_experts(gate_up, gate_up_scale, down, down_scale)
        return reference_with_shared(x, indices, weights, *full, *shared, act_dtype=x.dtype)
    from ._moe_gemv_triton import launch

    return launch(
        x,
        indices,
        weights,
        gate_up,
        down,
        gate_up_scale=gate_up_scale,
        down_scale=down_scale,
        per_pair=True,
        shared=(shared_gate, shared_up, shared_down),
        shared_scales=(shared_gate_scale, shared_up_scale, shared_down_scale),
        fused=FUSED_EXPERTS,
    )


@routed_and_shared_experts_gemv_fp8.register_fake
def _(x, indices, weights, gate_up, gate_up_scale, down, down_scale, sg, sg_scale, su, su_scale, sd, sd_scale):
    return fake_folded_output(x, indices, sg, down, True)


__all__ = [
    "routed_experts_gemv",
    "routed_experts_gemv_fp8",
    "routed_and_shared_experts_gemv",
    "routed_and_shared_experts_gemv_fp8",
    "shared_as_experts",
    "reference_with_shared",
    "summed_over_top_k",
    "fake_output",
    "output_slots",
    "linear_gemv_fp8",
    "linear_gemv",
    "gate_up_gemv",
    "linear_gemv_pair",
    "linear_gemv_pair_fp8",
    "norm_linear_gemv",
    "norm_linear_gemv_fp8",
    "norm_linear_gemv_pair",
    "norm_linear_gemv_pair_fp8",
    "rms_norm",
    "usable_linear",
    "decode_rows",
    "is_silu",
    "fp8_product",
    "usable_linear_fp8",
    "reference",
    "reference_fp8",
    "usable",
    "usable_fp8",
    "triton_available",
    "fp8_kernels_available",
    "ENABLED",
    "MAX_PAIRS",
    "MAX_BF16_LINEAR_ROWS",
    "MAX_LINEAR_ROWS",
    "SUM_TOP_K",
    "FUSED_GATE_UP",
    "FUSED_Q_KV_A",
    "FUSED_NORM_LINEAR",
    "FUSED_INPUT_NORM",
    "FOLD_SHARED",
    "FUSED_EXPERTS",
]
