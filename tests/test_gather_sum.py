"""The sum over each token's rows of an expert-sorted buffer (`kernels/gather_sum.py`) and the MoE combine built on
it (`moe.CombineSortedRows`): the values and gradients of indexing the rows back into token order, then summing."""

import pytest
import torch

from hf_deepseek.kernels import gather_sum
from hf_deepseek.modeling.moe import CombineSortedRows, PermuteRows

gpu = pytest.mark.gpu


def routed(tokens: int, top_k: int, experts: int, gen: torch.Generator):
    """(order, inverse) of `tokens` tokens each routed to `top_k` distinct experts, pairs sorted by expert."""
    indices = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    order = indices.flatten().argsort(stable=True)
    return order, torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))


def combine_and_gradients(combine, rows, weights, d_out):
    rows, weights = rows.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    out = combine(rows, weights)
    return (out, *torch.autograd.grad(out, (rows, weights), d_out))


def indexing_then_summing(order, inverse, top_k):
    """What `RoutedExperts` computed before `CombineSortedRows`: the rows back in token order, weighted, summed."""

    def combine(rows, weights):
        by_token = PermuteRows.apply(rows, inverse, order).view(-1, top_k, rows.shape[-1])
        return (by_token * weights[..., None].to(rows.dtype)).sum(dim=1)

    return combine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_gives_indexing_then_summing_and_its_gradients_bit_for_bit(dtype):
    """Output, the rows' gradient and the routing weights' gradient all equal autograd's of the torch expression."""
    gen = torch.Generator().manual_seed(0)
    tokens, top_k, hidden = 37, 3, 24
    order, inverse = routed(tokens, top_k, 8, gen)
    rows = torch.randn(tokens * top_k, hidden, generator=gen).to(dtype)
    weights, d_out = torch.rand(tokens, top_k, generator=gen), torch.randn(tokens, hidden, generator=gen).to(dtype)
    got = combine_and_gradients(lambda r, w: CombineSortedRows.apply(r, w, order, inverse, top_k), rows, weights, d_out)
    want = combine_and_gradients(indexing_then_summing(order, inverse, top_k), rows, weights, d_out)
    assert got[2].dtype == weights.dtype
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@gpu
@pytest.mark.parametrize("tokens,top_k,hidden", [(16384, 6, 2048), (77, 3, 72)])
def test_gather_sum_kernel_is_the_torch_expression_on_the_gpu(tokens, top_k, hidden):
    """The Triton kernel at the bench's shape and an odd one, weighted and not, on row-strided sources (the grouped
    GEMM's outputs are column slices): exactly torch's values (each product rounded as torch rounds it; float32
    sums a token's few bf16 values exactly here, so the order of the sum does not show)."""
    if not (torch.cuda.is_available() and gather_sum.triton_available()):
        pytest.skip("needs a CUDA device with Triton")
    gen = torch.Generator().manual_seed(tokens)
    rows = torch.randperm(tokens * top_k + 5, generator=gen)[: tokens * top_k].cuda()
    src = torch.randn(tokens * top_k + 5, hidden + 16, generator=gen).bfloat16().cuda()[:, :hidden]
    weights = torch.rand(tokens, top_k, generator=gen).cuda()
    for w in (weights, None):
        got = gather_sum.gather_sum(src, rows, top_k, w)
        assert torch.equal(got, gather_sum.gather_sum_reference(src, rows, top_k, w))


@gpu
def test_combine_on_the_gpu_gives_indexing_then_summing():
    """`CombineSortedRows` through the kernel: the output exactly the torch expression's, the gradients (torch's
    operations on both sides) too."""
    if not (torch.cuda.is_available() and gather_sum.triton_available()):
        pytest.skip("needs a CUDA device with Triton")
    gen = torch.Generator().manual_seed(1)
    tokens, top_k, hidden = 4096, 6, 2048
    order, inverse = (t.cuda() for t in routed(tokens, top_k, 64, gen))
    rows = torch.randn(tokens * top_k, hidden, generator=gen).bfloat16().cuda()
    weights = torch.rand(tokens, top_k, generator=gen).cuda()
    d_out = torch.randn(tokens, hidden, generator=gen).bfloat16().cuda()
    got = combine_and_gradients(lambda r, w: CombineSortedRows.apply(r, w, order, inverse, top_k), rows, weights, d_out)
    want = combine_and_gradients(indexing_then_summing(order, inverse, top_k), rows, weights, d_out)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
