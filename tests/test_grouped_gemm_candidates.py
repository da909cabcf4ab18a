"""The grouped GEMM candidates bench's CPU parts: its routing's segment sizes and its float32 references."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import grouped_gemm_candidates as bench  # noqa: E402


def test_segments_are_the_fp8_steps_aligned_layout_of_a_top_k_routing():
    sizes = bench.segment_sizes(1000, 6, 16, seed=3)
    assert len(sizes) == 16 and all(s % bench.ALIGN == 0 for s in sizes)
    gen = torch.Generator().manual_seed(3)
    counts = torch.bincount(torch.rand(1000, 16, generator=gen).topk(6, dim=-1).indices.flatten(), minlength=16)
    assert all(s - bench.ALIGN < c <= s for s, c in zip(sizes, counts.tolist(), strict=True))
    assert bench.product_flops([128, 256], 64, 32) == 2 * 384 * 64 * 32


def test_references_multiply_each_segment_by_its_own_expert():
    torch.manual_seed(0)
    sizes = [3, 0, 5]
    x, dy = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    w = torch.randn(3, 6, 4, dtype=torch.float64)
    got = bench.reference_products(x, w, sizes)
    want = torch.cat([x[:3] @ w[0].t(), x[3:] @ w[2].t()]).float()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = bench.reference_weight_grads(dy, x, sizes)
    assert grads.shape == (3, 6, 4) and torch.count_nonzero(grads[1]) == 0
    assert torch.allclose(grads[2], (dy[3:].t() @ x[3:]).float(), rtol=1e-5, atol=1e-5)
    q, s = bench.rowwise_fp8(x.float())
    assert bench.relative_error(q.float() * s[:, None], x.float()) < 0.05


def test_torchs_weight_gradient_candidates_compute_the_reference():
    """Both torch candidates (dy^T a transposed view, and copied) give each expert's dy^T x (CPU grouped GEMM)."""
    torch.manual_seed(0)
    sizes = [128, 0, 256]
    dy, x = torch.randn(384, 48).bfloat16(), torch.randn(384, 32).bfloat16()
    want = bench.reference_weight_grads(dy, x, sizes)
    candidates = bench.weight_grad_candidates(dy, x, sizes, None)
    assert len(candidates) == 2
    for name, run in candidates.items():
        assert bench.relative_error(run().float(), want) < 1e-2, name
