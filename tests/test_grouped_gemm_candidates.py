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
    assert bench.block_experts([128, 0, 384]).tolist() == [0, 2, 2, 2]


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


def scaled_grouped_mm_2d_2d(a, b, scale_a, scale_b, offs, out_dtype, use_fast_accum):
    """torch's `_scaled_grouped_mm` of two 2-D operands split along K at `offs` (CUDA only), in float64:
    out[g] = (a[:, K_g] scale_a[g*M:(g+1)*M, None]) (b[K_g] scale_b[None, g*N:(g+1)*N])."""
    (m, _), n, start, out = a.shape, b.shape[1], 0, []
    for g, end in enumerate(offs.tolist()):
        a_g = a[:, start:end].double() * scale_a[g * m : (g + 1) * m, None].double()
        out.append(a_g @ (b[start:end].double() * scale_b[None, g * n : (g + 1) * n].double()))
        start = end
    return torch.stack(out).to(out_dtype)


def test_weight_gradient_candidates_compute_the_reference():
    """torch's bf16 candidates (dy^T a transposed view, and copied) give each expert's dy^T x (CPU grouped GEMM); the
    FP8 ones' operands, each expert's rows scaled per column, give it within E4M3's rounding through the op's
    documented arithmetic (the op itself runs on CUDA only)."""
    torch.manual_seed(0)
    sizes = [128, 0, 256]
    dy, x = torch.randn(384, 48).bfloat16(), torch.randn(384, 32).bfloat16()
    dy[128:] *= 1e5  # the third expert's rows far larger: one scale per expert and column, not per column
    want = bench.reference_weight_grads(dy, x, sizes)
    candidates = bench.weight_grad_candidates(dy, x, sizes, None)
    assert len(candidates) == 5
    for name, run in candidates.items():
        if "(x^T dy)^T" in name:
            assert run.func is bench.transposed_copy
            run = run.args[0]  # the product, before its transpose
            assert run.func is torch._scaled_grouped_mm and run.args[0].dtype == torch.float8_e4m3fn
            got = scaled_grouped_mm_2d_2d(*run.args, **run.keywords).transpose(-2, -1)
            assert 1e-3 < bench.relative_error(got, want) < 0.06, name
        elif "FP8" in name:
            assert run.func is torch._scaled_grouped_mm and run.args[0].dtype == torch.float8_e4m3fn
            got = scaled_grouped_mm_2d_2d(*run.args, **run.keywords)
            assert 1e-3 < bench.relative_error(got[0], want[0]) < 0.06, name  # the small expert, rounded to E4M3
            assert 1e-3 < bench.relative_error(got, want) < 0.06, name
        else:
            assert bench.relative_error(run().float(), want) < 1e-2, name
