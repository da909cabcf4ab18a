"""The Triton kernel of `adamw.py` (imported only where Triton and CUDA exist): one AdamW update of a contiguous
parameter, its gradient and both moments, each element read and written once, in fp32 arithmetic between loads and
stores in the tensors' own dtypes, as torch's fused AdamW computes it."""

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

BLOCK = 4096  # elements a program: 16 per thread at 8 warps, 32-byte loads of bf16
WARPS = 8


@triton.jit
def adamw_values(p, g, m, v, lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    """p -= lr_decay * p; m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;
    p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps), in float32: the new (p, m, v)."""
    p = p - lr_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt_rn(v) / bias_correction2_sqrt + eps)
    return p, m, v


@triton.jit
def adamw_in_place(p_ptr, g_ptr, m_ptr, v_ptr, offsets, mask, lr_decay, beta1, beta2, eps, step_size,
                   bias_correction2_sqrt):  # fmt: skip
    """`adamw_values` of the elements at `offsets`, read and written back in the tensors' dtypes; returns the new p
    as stored (in p's dtype; zero where `mask` is off: every input reads as zero there)."""
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p, m, v = adamw_values(p, g, m, v, lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)
    p = p.to(p_ptr.dtype.element_ty)
    tl.store(p_ptr + offsets, p, mask=mask)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)
    return p


@triton.jit
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n, lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """`adamw_values` for the program's BLOCK elements of n."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2^31
    adamw_in_place(p_ptr, g_ptr, m_ptr, v_ptr, offsets, offsets < n, lr_decay, beta1, beta2, eps, step_size,
                   bias_correction2_sqrt)  # fmt: skip


@triton.jit
def one_minus_power(log_beta, step):
    """1 - beta^step from ln(beta), in float32 without cancellation where beta^step is near 1 (beta2 = 0.999 at the
    first steps): -expm1(step ln beta), by its series for |step ln beta| < 0.1."""
    x = step * log_beta
    series = x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6)))))
    return -tl.where(tl.abs(x) < 0.1, series, tl.exp(x) - 1)


@triton.jit
def _adamw_device_step_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n, step_ptr, lr, lr_decay, beta1, beta2, log_beta1, log_beta2, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """`_adamw_kernel` with the bias corrections made from the step count in device memory (already incremented):
    the update a CUDA graph replays (`TritonAdamW(capturable=True)`)."""
    step = tl.load(step_ptr).to(tl.float32)
    step_size = lr / one_minus_power(log_beta1, step)
    bias_correction2_sqrt = tl.sqrt(one_minus_power(log_beta2, step))
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    adamw_in_place(p_ptr, g_ptr, m_ptr, v_ptr, offsets, offsets < n, lr_decay, beta1, beta2, eps, step_size,
                   bias_correction2_sqrt)  # fmt: skip


def adamw_update_device_step(p, g, m, v, step, lr, lr_decay, beta1, beta2, eps) -> None:
    """`adamw_update` with the step count a one-element float32 tensor on p's device (incremented before)."""
    n = p.numel()
    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
        _adamw_device_step_kernel[(triton.cdiv(n, BLOCK),)](
            p, g, m, v, n, step, lr, lr_decay, beta1, beta2, math.log(beta1), math.log(beta2), eps,
            BLOCK=BLOCK, num_warps=WARPS,
        )  # fmt: skip
    increment_version(p)


def adamw_update(p, g, m, v, lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt) -> None:
    """Launch the update of one parameter (every tensor contiguous, of p's shape), on p's GPU whichever is current
    (a model spread over several GPUs by `device_map`)."""
    n = p.numel()
    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():  # CPU: Triton's interpreter
        _adamw_kernel[(triton.cdiv(n, BLOCK),)](
            p, g, m, v, n, lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt, BLOCK=BLOCK, num_warps=WARPS
        )
    increment_version(p)  # as torch's in-place update would: what was made from the old p sees it changed
