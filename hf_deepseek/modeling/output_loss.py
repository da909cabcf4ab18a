"""The output head and its cross-entropy in chunks, without the [tokens, vocabulary] logits in memory.

At 16k tokens and DeepSeek-V3's 129k vocabulary the logits alone are 4 GiB in bf16 (8 in fp32), and autograd keeps
them, and their gradient, for the backward pass. `LinearCrossEntropy` walks the tokens in chunks: for each it
computes the logits, the loss terms and, since the loss is the last operation of the step, the gradients of the
hidden states and of the head's weight right away (softmax minus one-hot, times the head), then drops the
logits. Backward only scales those saved gradients. The FLOPs are those of the unfused head; the memory is one
chunk's logits, their gradient written over them. This is the fused linear cross-entropy of Liger-Kernel and
torchtitan's chunked loss. As in both, the head's gradient is summed over the chunks in the weight's dtype, here by
the GEMMs themselves (addmm into the sum: fp32 sums inside each, rounded once a chunk), with no [vocabulary, hidden]
product or fp32 copy per chunk.

On CUDA each chunk's loss terms and gradient are one Triton kernel (`kernels/_cross_entropy_triton.py`, the custom op
`cross_entropy_rows_in_place`): a program reads its row once for the logsumexp (an online max and sum) and once more
for the gradient, written over it: faster than Inductor's kernel of the same function (`_chunk_terms_over_logits`,
compiled) on an H100, timed side by side by `benchmarks/cross_entropy_kernel_bench.py` (the figures beside the
kernel's BLOCK). `TRITON_LOSS = False` keeps Inductor's, as does every other case (plain torch off CUDA).

Used by `DeepSeekForCausalLM` in training mode when `model.fused_output_loss` is set
(`enable_fused_output_loss(model)`); the output's `logits` is then None.
"""

import torch
from torch import nn

from ..kernels.moe_gemv import triton_available

IGNORE_INDEX = -100
TRITON_LOSS = True  # False: Inductor's kernel of `_chunk_terms_over_logits` on CUDA too (to time both in one run)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _chunk_terms(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor):
    """(sum of -log p(target) over valid rows, d loss / d logits in the logits' dtype) of one chunk [c, V]. Written
    as reductions and elementwise work over `logits` only, so that Inductor reads the chunk twice and writes its
    gradient once."""
    out_dtype, logits = logits.dtype, logits.float()
    valid = targets != IGNORE_INDEX
    lse = logits.logsumexp(dim=-1)
    is_target = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    picked = torch.where(is_target, logits, 0.0).sum(dim=-1)
    loss = ((lse - picked) * valid).sum()
    grad = ((logits - lse[:, None]).exp() - is_target.float()) * (valid[:, None] * scale)
    return loss, grad.to(out_dtype)


def _chunk_terms_over_logits(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_chunk_terms`, its gradient written over the chunk's logits (returns the loss sum): one [c, V] buffer alive
    for the chunk, not two (0.5 GB at 2048 tokens and a 129k vocabulary, at the end of the forward pass, where the
    step's memory peaks). Compiled on CUDA, the gradient's kernel stores into the logits it reads elementwise."""
    loss, grad = _chunk_terms(logits, targets, scale)
    logits.copy_(grad)
    return loss


def _scaled_to(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * scale in the parameter's dtype, computed in fp32 (compiled on CUDA: one pass over the head's gradient)."""
    return (grad.float() * scale).to(dtype)


def _scale_in_place(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_scaled_to` for a gradient already in the parameter's dtype, written over it: no second [V, d] buffer alive
    next to the saved one at the start of the backward pass, where the activations are all still kept."""
    return grad.copy_((grad.float() * scale).to(grad.dtype))


@torch.library.custom_op("hf_deepseek::cross_entropy_rows_in_place", mutates_args=("logits",))
def cross_entropy_rows_in_place(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_chunk_terms_over_logits` as one op (one node under torch.compile, which keeps the kernel's in-place write):
    the Triton kernel on CUDA, the torch function elsewhere."""
    if not logits.is_cuda:
        return _chunk_terms_over_logits(logits, targets, scale)
    from ..kernels._cross_entropy_triton import cross_entropy_rows_in_place as launch

    return launch(logits, targets, scale)


@cross_entropy_rows_in_place.register_fake
def _(logits, targets, scale):
    return logits.new_empty((), dtype=torch.float32)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_chunk_terms_over_logits`: the Triton kernel where it serves (CUDA with Triton, `TRITON_LOSS`, a contiguous
    [c, V] chunk of a float dtype, an fp32 scale), compiled torch otherwise."""
    if (
        TRITON_LOSS
        and logits.is_cuda
        and triton_available()
        and logits.dim() == 2
        and logits.is_contiguous()
        and logits.dtype in KERNEL_DTYPES
        and scale.dtype == torch.float32
    ):
        return cross_entropy_rows_in_place(logits, targets, scale)
    return _on_cuda_compiled(_chunk_terms_over_logits, logits, targets, scale)


_COMPILED: dict = {}


def _on_cuda_compiled(fn, *args):
    """fn(*args), through its own torch.compile on CUDA when not already inside a compiled region."""
    if args[0].is_cuda and not torch.compiler.is_compiling():
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn, dynamic=False)
        return _COMPILED[fn](*args)
    return fn(*args)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of -log softmax(hidden @ weight^T)[target] / denominator, in `chunks` row chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, denominator, chunks: int):
        rows = hidden.shape[0]
        size = -(-rows // chunks)
        scale = 1.0 / denominator.float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, size):
            h, chunk_targets = hidden[start : start + size], targets[start : start + size]
            grad_logits = h @ weight.t()  # the logits, then (in place) their gradient
            total = total + _chunk_loss(grad_logits, chunk_targets, scale)
            grad_hidden[start : start + size] = grad_logits @ weight
            if grad_weight is None:
                grad_weight = grad_logits.t() @ h
            else:  # the GEMM adds into the sum itself (beta = 1): no product or fp32 copy of 129k x 2048 per chunk
                grad_weight.addmm_(grad_logits.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        # the saved gradients are scaled in place (they serve this backward only; a second backward through the
        # same graph, retain_graph=True, finds them changed and autograd raises)
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight.dtype == ctx.weight_dtype:
            grad_weight = _on_cuda_compiled(_scale_in_place, grad_weight, grad_loss)
        else:  # fp32 weights under autocast: the bf16 sums become the weight's dtype
            grad_weight = _on_cuda_compiled(_scaled_to, grad_weight, grad_loss, ctx.weight_dtype)
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight, None, None, None


def causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch=None,
    chunks: int = 8,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss of `head(hidden)` against `labels` (shifted by one, or `shift_labels` as
    given; -100 ignored; a mean over the counted tokens, or their sum over `num_items_in_batch`), without
    materialising the logits."""
    if shift_labels is None:
        shift_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    targets = shift_labels.flatten()
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return LinearCrossEntropy.apply(flat, head.weight, targets.to(hidden.device), denominator, chunks)


def enable_fused_output_loss(model: nn.Module, chunks: int = 8) -> nn.Module:
    """In training mode with labels, compute the model's losses (main and MTP) with `causal_lm_loss`; the output's
    logits are then None. Returns the model."""
    model.fused_output_loss = chunks
    return model
