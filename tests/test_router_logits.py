"""`modeling.router_logits`: the routers' logits from bf16 GEMMs with fp32 outputs and their gradients from a two-term
bf16 split, against the fp32 GEMM of the upcasts and float64. On the CPU the function's products run as fp32 GEMMs
of the bf16 values (the same products and fp32 sums); on a GPU, cuBLAS's bf16 kernels, eager and compiled."""

import pytest
import torch
import torch.nn.functional as F

from hf_deepseek.modeling import router_logits
from hf_deepseek.modeling.router_logits import TensorCoreRouterLogits

BF16_STEP = 2**-8  # a bf16 value's rounding error, relative


def operands(device="cpu", tokens=300, hidden=256, experts=64, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(experts, hidden, device=device, generator=gen) * 0.05).bfloat16().requires_grad_(True)
    grad = torch.randn(tokens, experts, device=device, generator=gen) * 1e-3  # fp32, not bf16-representable
    return x, weight, grad


def float64_gradients(x, weight, grad):
    """(d x, d weight) in float64, and the sums of their terms' magnitudes (|g| @ |W|, |g|^T @ |x|)."""
    g, w, xs = grad.double(), weight.double(), x.double()
    return (g @ w, g.t() @ xs), (g.abs() @ w.abs(), g.abs().t() @ xs.abs())


def within_bf16_rounding(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """Each element within one bf16 rounding of the float64 value, plus 2^-17 of the sum of its terms' magnitudes:
    the two-term split's error (2^-18 of each |g|) and fp32 sums' (K 2^-24, K <= 64 here) where the terms cancel."""
    return bool(((got.double() - want).abs() <= BF16_STEP * want.abs() + 2**-17 * magnitude).all())


def run(fn, x, weight, grad):
    x.grad = weight.grad = None
    logits = fn(x, weight)
    logits.backward(grad)
    return logits, x.grad, weight.grad


def test_logits_are_the_fp32_gemms_and_gradients_within_bf16_rounding_of_float64():
    x, weight, grad = operands()
    logits, grad_x, grad_weight = run(TensorCoreRouterLogits.apply, x, weight, grad)
    assert logits.dtype == torch.float32 and grad_x.dtype == grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits, F.linear(x.float(), weight.float()), rtol=1e-6, atol=1e-6)
    (want_x, want_weight), (size_x, size_weight) = float64_gradients(x, weight, grad)
    assert within_bf16_rounding(grad_x, want_x, size_x) and within_bf16_rounding(grad_weight, want_weight, size_weight)
    # the plain path's gradients (fp32 GEMMs, then rounded) meet the same bound, and are bit for bit these but for
    # the few elements whose fp32 value lies within the split's error of a bf16 rounding boundary
    _, plain_x, plain_weight = run(lambda a, b: F.linear(a.float(), b.float()), x, weight, grad)
    assert within_bf16_rounding(plain_x, want_x, size_x) and within_bf16_rounding(
        plain_weight, want_weight, size_weight
    )
    assert (grad_x == plain_x).float().mean() > 0.99 and (grad_weight == plain_weight).float().mean() > 0.99


def test_the_split_keeps_what_bf16_alone_would_lose():
    """With the output gradient rounded to bf16 instead of split, the input gradient leaves bf16 rounding of float64:
    the test above could fail."""
    x, weight, grad = operands(seed=1)
    (want_x, _), (size_x, _) = float64_gradients(x, weight, grad)
    rounded = (grad.bfloat16().float() @ weight.float()).bfloat16()
    assert not within_bf16_rounding(rounded, want_x, size_x)
    _, grad_x, _ = run(TensorCoreRouterLogits.apply, x, weight, grad)
    assert within_bf16_rounding(grad_x, want_x, size_x)


def test_router_logits_takes_the_function_only_where_enabled_on_cuda(monkeypatch):
    x, weight, _ = operands(tokens=8, hidden=16, experts=4)
    calls = []
    monkeypatch.setattr(TensorCoreRouterLogits, "apply", lambda *a: calls.append(a) or F.linear(*a))
    for enabled in (False, True):
        monkeypatch.setattr(router_logits, "ENABLED", enabled)
        out = router_logits.router_logits(x, weight)
        assert out.dtype == torch.float32 and out.grad_fn is not None
    assert calls == []  # CPU tensors: the fp32 GEMM of the upcasts whatever the switch


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_tensor_core_router_logits_on_the_gpu(monkeypatch, compiled):
    """At the bench's router shape (16,384 tokens, hidden 2048, 64 experts), through `router_logits` as the routers
    call it: the logits as the fp32 GEMM's to fp32 sums' order, the gradients within bf16 rounding of float64."""
    monkeypatch.setattr(router_logits, "ENABLED", True)
    x, weight, grad = operands("cuda", tokens=16384, hidden=2048, experts=64)
    fn = torch.compile(router_logits.router_logits, fullgraph=True) if compiled else router_logits.router_logits
    logits, grad_x, grad_weight = run(fn, x, weight, grad)
    want = F.linear(x.double(), weight.double())
    assert ((logits.double() - want).abs() <= 1e-5 * want.abs().max()).all()
    (want_x, want_weight), (size_x, size_weight) = float64_gradients(x, weight, grad)
    assert within_bf16_rounding(grad_x, want_x, size_x) and within_bf16_rounding(grad_weight, want_weight, size_weight)
