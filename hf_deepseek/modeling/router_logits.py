"""A MoE router's logits x @ W^T in fp32 from bf16 x and W on tensor cores (opt-in: `ENABLED`).

The router scores experts in fp32 (`moe.TopKRouter`), so the plain path upcasts x and W and runs an fp32 GEMM: on an
H100 its three GEMMs a layer (forward, input and weight gradients) took 2.6 ms of a training step at ~35 TFLOP/s on
CUDA cores, and the fp32 copy of x is kept for the backward. Here the forward is a bf16 GEMM with an fp32 output
(`torch.mm(..., out_dtype=torch.float32)`): products of bf16 values are exact in fp32 and the sums are fp32, as in
the fp32 GEMM, so the logits are the same up to the order of the sums. The backward splits the fp32 output gradient
g into two bf16 terms, hi = bf16(g) and lo = bf16(g - hi) (g to about 16 significant bits), and computes
dx = [hi | lo] @ [W ; W] in one bf16 GEMM rounded once to x's dtype, and dW = hi^T x + lo^T x with fp32 outputs: each
within rounding of its dtype of the fp32 computation, and only bf16 x is kept.
"""

import torch
import torch.nn.functional as F

ENABLED = False  # read where the step is built or compiled; `hf-deepseek bench train` variants "-tensor-core-router"


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 matrices with an fp32 output: tensor cores on CUDA; elsewhere the same products and fp32 sums."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class TensorCoreRouterLogits(torch.autograd.Function):
    """x [N, d] bf16, weight [E, d] bf16 -> x @ weight^T [N, E] in fp32."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _mm_fp32(x, weight.t())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.float()
        hi = grad.to(torch.bfloat16)
        lo = (grad - hi.float()).to(torch.bfloat16)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            split = torch.cat([hi, lo], dim=1)  # [N, 2E] @ [2E, d]: hi @ W + lo @ W in one product
            stacked = torch.cat([weight, weight], dim=0)
            grad_x = torch.mm(split, stacked) if x.is_cuda else _mm_fp32(split, stacked).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (_mm_fp32(hi.t(), x) + _mm_fp32(lo.t(), x)).to(weight.dtype)
        return grad_x, grad_weight


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, d] @ weight [E, d]^T in fp32: `TensorCoreRouterLogits` where `ENABLED` and both are bf16 CUDA tensors,
    else the fp32 GEMM of their upcasts."""
    if ENABLED and x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and x.dim() == 2:
        return TensorCoreRouterLogits.apply(x, weight)
    return F.linear(x.float(), weight.float())
