"""DeepSeek's DeepGEMM blockwise FP8 grouped GEMMs for the routed experts' training GEMMs of the paper's recipe
(1x128 activation tiles, 128x128 weight blocks), from the optional `sgl-deep-gemm` wheel (extra `deepgemm`: SGLang's
build of DeepGEMM on the registry; it compiles its kernels with the machine's nvcc on first use):

- the forward, x W[e]^T over the experts' 128-aligned row segments (`m_grouped_fp8_gemm_nt_contiguous`);
- the input gradient, dy W[e], straight from the forward's FP8 weight and its 128x128 block scales
  (`m_grouped_fp8_gemm_nn_contiguous`; where a build refuses W's N-major operand, the nt kernel on W's FP8 values
  and scales transposed, a copy of FP8 bytes): W^T needs no quantisation of its own, the reason the paper scales
  weights by blocks.

`FP8Recipe(grouped_gemm="deep_gemm")` (the blockwise recipe only) takes them where the wheel imports on a Hopper GPU;
elsewhere the recipe keeps its Triton kernels. Opt-in until measured in the training step (bench variant
`hf_deepseek-fp8-deep-gemm`; `benchmarks/grouped_gemm_candidates.py` times the kernels alone).
"""

import functools
import logging

import torch

logger = logging.getLogger(__name__)
# set once DeepGEMM's nn kernel refused this device's operands: the input gradient then transposes W's FP8 blocks
NN_TRANSPOSED = False


@functools.cache
def available() -> bool:
    """Whether DeepGEMM's grouped kernels serve here: a Hopper GPU (compute capability 9.x) and the wheel importing."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    try:
        import deep_gemm
    except Exception:  # not installed, or built for another torch / CUDA: the Triton kernels then
        return False
    return hasattr(deep_gemm, "m_grouped_fp8_gemm_nt_contiguous") and hasattr(
        deep_gemm, "m_grouped_fp8_gemm_nn_contiguous"
    )


def row_experts(block_expert: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The expert of each laid-out row, int32 [rows], as DeepGEMM's contiguous layout takes it: -1 (skipped) for the
    rows of unused blocks past the last segment (`ExpertLayout.block_expert` [rows / block])."""
    return block_expert.to(torch.int32).repeat_interleave(block)


def grouped_nt(a, a_scale, b, b_scale, experts: torch.Tensor) -> torch.Tensor:
    """a [R, K] FP8 with 1x128 tile scales [R, K/128] (column-major), b [E, N, K] FP8 with 128x128 block scales
    [E, N/128, K/128], `experts` [R] (`row_experts`) -> bf16 [R, N]: row r times b[experts[r]]^T (rows of expert -1
    left undefined)."""
    return _grouped_nt(a, a_scale, b, b_scale, experts)


def grouped_nn(a, a_scale, b, b_scale, experts: torch.Tensor) -> torch.Tensor:
    """a [R, N] FP8 with 1x128 tile scales [R, N/128], b [E, N, K] FP8 (the forward's weight) with its block scales
    [E, N/128, K/128], `experts` [R] -> bf16 [R, K]: row r times b[experts[r]] (the input gradient dy W)."""
    return _grouped_nn(a, a_scale, b, b_scale, experts)


def _nt_into(out, a, a_scale, b, b_scale, experts) -> None:
    import deep_gemm

    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, a_scale), (b.contiguous(), b_scale.contiguous()), out, experts)


# DeepGEMM's functions write into an output they are given: wrapped as custom ops of one returned tensor, so that
# Dynamo traces them as opaque calls with their output shapes
@torch.library.custom_op("hf_deepseek::deep_gemm_grouped_nt", mutates_args=())
def _grouped_nt(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    out = a.new_empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    _nt_into(out, a, a_scale, b, b_scale, experts)
    return out


@_grouped_nt.register_fake
def _(a, a_scale, b, b_scale, experts):
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("hf_deepseek::deep_gemm_grouped_nn", mutates_args=())
def _grouped_nn(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    import deep_gemm

    global NN_TRANSPOSED
    out = a.new_empty(a.shape[0], b.shape[2], dtype=torch.bfloat16)
    if not NN_TRANSPOSED:
        try:
            weight = (b.contiguous(), b_scale.contiguous())
            deep_gemm.m_grouped_fp8_gemm_nn_contiguous((a, a_scale), weight, out, experts)
            return out
        except RuntimeError as err:  # Hopper's FP8 tensor cores read K-major operands only: a build may refuse
            NN_TRANSPOSED = True
            reason = str(err).splitlines()[0][:200]
            logger.warning("DeepGEMM's nn grouped GEMM refused (%s); transposing the FP8 weight for nt.", reason)
    # W^T's FP8 values and scales are W's transposed (128x128 blocks): a copy of FP8 bytes, nothing quantised
    _nt_into(out, a, a_scale, b.transpose(1, 2), b_scale.transpose(1, 2), experts)
    return out


@_grouped_nn.register_fake
def _(a, a_scale, b, b_scale, experts):
    return a.new_empty(a.shape[0], b.shape[2], dtype=torch.bfloat16)


__all__ = ["available", "grouped_nn", "grouped_nt", "row_experts"]
