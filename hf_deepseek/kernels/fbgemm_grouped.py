"""FBGEMM's CUTLASS grouped GEMMs for the routed experts' training GEMMs, from the optional `fbgemm-gpu-genai`
wheel (extra `fbgemm`; 1.6.0 is the release built for torch 2.11 and CUDA 13): FP8 rowwise products over the
experts' row segments (`f8f8bf16_rowwise_grouped_stacked`) and bf16 weight gradients over them
(`bf16bf16bf16_grouped_wgrad`); for the paper's blockwise recipe, FP8 products with 1x128 activation tiles and
128x128 weight blocks (`f8f8bf16_groupwise_grouped`, 734-830 TFLOP/s on an H100 at the bench's expert shapes against
torch's bf16 574-712, docs/PERF.md 2026-12-07c). `FP8Recipe(grouped_gemm="fbgemm")` takes them where the wheel
imports on a Hopper GPU; elsewhere the recipe keeps torch's kernels (rowwise) or its Triton ones (blockwise).

Timed alone at the training bench's expert shapes on an H100 (`benchmarks/grouped_gemm_candidates.py`, docs/PERF.md
2026-12-06): the FP8 rowwise products 1.07-1.15x torch's `_scaled_grouped_mm` (925-1142 TFLOP/s), the bf16 weight
gradients 2.0-2.2x torch's `_grouped_mm` over the token dimension with dy^T copied first, as the FP8 step computes
them (480-567 TFLOP/s against 219-287). In the bench's compiled FP8 step on an H100 they take 2.0 ms off torch's
(217.4 against 219.4 ms); with the linear layers' weight gradient in bf16 too, the rowwise recipe's defaults since,
the step runs at 1.01-1.02x bf16's (docs/PERF.md, Training).
"""

import functools
import logging

import torch


@functools.cache
def available() -> bool:
    """Whether FBGEMM's grouped kernels serve here: a Hopper GPU (compute capability 9.x) and the wheel importing."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    logging.disable(logging.WARNING)  # its import warns that its torch-compatibility table lacks its own version
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm's gen_ai kernels)
    except Exception:  # not installed, or built for another torch / CUDA: torch's kernels then
        return False
    finally:
        logging.disable(logging.NOTSET)
    ops = torch.ops.fbgemm
    return hasattr(ops, "f8f8bf16_rowwise_grouped_stacked") and hasattr(ops, "bf16bf16bf16_grouped_wgrad")


def blockwise_available() -> bool:
    """Whether FBGEMM's blockwise grouped GEMM (1x128 activation tiles, 128x128 weight blocks) serves here."""
    return available() and hasattr(torch.ops.fbgemm, "f8f8bf16_groupwise_grouped")


def grouped_m_major_scales(scale: torch.Tensor, seg_start: torch.Tensor, group_rows: torch.Tensor) -> torch.Tensor:
    """1x128 tile scales [R, K/128] (any strides) -> the same values in FBGEMM's grouped M-major layout ([R, K/128]
    storage where group g, rows s_g .. s_g + m_g, holds its scales as [K/128, m_g] from offset s_g * K/128), the
    layout its `quantize_fp8_group(x, m_sizes=...)` writes. The rows past the last group (unused rows of an
    `ExpertLayout`'s buffer, which FBGEMM does not read) keep their row-major places after the groups'."""
    rows, tiles = scale.shape
    row = torch.arange(rows, device=scale.device)
    tile = torch.arange(tiles, device=scale.device)[None, :]
    starts = seg_start.long()
    group = torch.searchsorted(starts, row, right=True) - 1  # the segment holding each row
    start, size = starts[group], group_rows[group]
    in_groups = (row < starts[-1] + group_rows[-1])[:, None]
    dest = torch.where(
        in_groups, (start * tiles + row - start)[:, None] + tile * size[:, None], row[:, None] * tiles + tile
    )
    out = scale.new_empty(rows * tiles)
    out[dest.flatten()] = scale.reshape(-1).float()
    return out.view(rows, tiles)


def blockwise_grouped(a, a_scale, b, b_scale, seg_start: torch.Tensor, seg_end: torch.Tensor) -> torch.Tensor:
    """a [R, K] FP8 with 1x128 tile scales [R, K/128] (an `ExpertLayout`'s buffer, segments `seg_start` ..
    `seg_end`), b [E, N, K] FP8 with 128x128 block scales [E, N/128, K/128] -> bf16 [R, N]: segment e of a's rows
    times b[e]^T (rows past the last segment left undefined)."""
    group_rows = segment_rows(seg_start, seg_end)
    a_scale = grouped_m_major_scales(a_scale, seg_start, group_rows)
    # FBGEMM takes the weights' block scales MN-major: [E, K/128, N/128]
    return _blockwise_grouped(a, a_scale, b, b_scale.transpose(1, 2).contiguous(), group_rows)


def segment_rows(seg_start: torch.Tensor, seg_end: torch.Tensor) -> torch.Tensor:
    """Rows of each expert's segment, int64 [E], as FBGEMM's kernels take them (segments consecutive from row 0;
    rows past the last one are not read)."""
    return (seg_end - seg_start).to(torch.int64)


def rowwise_grouped(a, a_scale, b, b_scale, rows: torch.Tensor) -> torch.Tensor:
    """a [R, K] FP8 with one scale a row ([R]), b [E, N, K] FP8 with one scale per expert row ([E, N]) ->
    bf16 [R, N]: segment e of a's rows (`rows` [E] of them, in order) times b[e]^T."""
    return _rowwise_grouped(a, a_scale, b, b_scale, rows)


def weight_grads(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dy [R, N], x [R, K] (bf16) -> bf16 [E, N, K]: dy[segment e]^T x[segment e] for each expert's `rows`."""
    return _grouped_wgrad(dy, x, rows)


# FBGEMM's ops in custom ops of this project, with their output shapes for tracing: Inductor lowered FBGEMM's weight
# gradient as a multi-output node and failed on it ("<built-in function getitem> is not an OpOverload", H100,
# 2026-12-06); as an opaque op of one tensor it calls the kernel as it is.
@torch.library.custom_op("hf_deepseek::fbgemm_rowwise_grouped", mutates_args=())
def _rowwise_grouped(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    ops = torch.ops.fbgemm
    return ops.f8f8bf16_rowwise_grouped_stacked(a.contiguous(), b.contiguous(), a_scale.contiguous(),
                                                b_scale.contiguous(), rows.contiguous())  # fmt: skip


@_rowwise_grouped.register_fake
def _(a, a_scale, b, b_scale, rows):
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("hf_deepseek::fbgemm_blockwise_grouped", mutates_args=())
def _blockwise_grouped(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, group_rows: torch.Tensor
) -> torch.Tensor:
    return torch.ops.fbgemm.f8f8bf16_groupwise_grouped(a.contiguous(), b.contiguous(), a_scale, b_scale, group_rows)


@_blockwise_grouped.register_fake
def _(a, a_scale, b, b_scale, group_rows):
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("hf_deepseek::fbgemm_grouped_wgrad", mutates_args=())
def _grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # FBGEMM zero-fills a whole output it allocates itself (2.4 ms of a step's fills at the bench's shapes, H100,
    # 2026-12-06: the op's device time past its GEMM kernel's); given one, it writes the experts that have rows, and
    # only the idle experts' slices are zeroed here
    from ._idle_experts_triton import zero_idle_experts

    out = dy.new_empty(rows.shape[0], dy.shape[1], x.shape[1])
    torch.ops.fbgemm.bf16bf16bf16_grouped_wgrad(dy.contiguous(), x.contiguous(), rows.contiguous(), out)
    return zero_idle_experts(out, rows)


@_grouped_wgrad.register_fake
def _(dy, x, rows):
    return dy.new_empty(rows.shape[0], dy.shape[1], x.shape[1], dtype=torch.bfloat16)
