"""One decode row's MLA input chain in one launch (opt-in, HF_DEEPSEEK_MLA_CHAIN=1; bench row `ours-fast-mla-chain`):
q_a and kv_a (`moe_gemv.linear_gemv_pair`), q_b with the q_a norm (`moe_gemv.norm_linear_gemv`) and the front
(`mla_front.mla_decode_front`: kv norm, RoPE, the cache write and W_UK) as the phases of one persistent kernel with
grid barriers between them (`_mla_chain_triton.py`), where at batch 1 they are three launches of 5.7-6.6 us each
for 2-9 MB apiece. `mla_decode_chain` is a custom op (one node under torch.compile, captured by CUDA graphs): the
kernel on CUDA, the three ops' own computations elsewhere (`reference`, what the CPU tests run); the kernel's phases
are those ops' programs, so it gives their results (`_mla_chain_triton.py` says where a rounding may differ).
"""

import os

import torch

from .mla_front import mla_decode_front
from .moe_gemv import linear_gemv_pair, norm_linear_gemv, triton_available

ENABLED = os.environ.get("HF_DEEPSEEK_MLA_CHAIN", "0") == "1"


def usable(x: torch.Tensor, storage: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernel serves this one bf16 row (set-up time checks): switched on, CUDA with Triton, the weights
    and the cache in the row's dtype."""
    same = all(w.dtype == x.dtype for w in weights) and storage.dtype == x.dtype
    return ENABLED and x.is_cuda and triton_available() and x.shape[0] == 1 and x.dtype == torch.bfloat16 and same


def reference(x, w_qa, w_kva, g_q, eps_q, w_qb, cos, sin, g_kv, eps_kv, w_uk, storage, length, interleaved: bool):
    """The chain as the three ops compute it: x [1, d] -> (the joined query [1, H, r + rope], the new length [1]
    int32), the new token's cache entry written at `length` of storage [1, L, r + rope], length moved on."""
    heads, head_dim = w_uk.shape[0], w_qb.shape[0] // w_uk.shape[0]
    qkv = linear_gemv_pair(x, w_qa, w_kva)
    q_a, kv_a = qkv.split([w_qa.shape[0], w_kva.shape[0]], dim=-1)
    q = norm_linear_gemv(q_a, g_q, eps_q, w_qb).view(1, heads, head_dim)
    return mla_decode_front(q, kv_a, cos, sin, g_kv, eps_kv, w_uk, storage, length, interleaved)


@torch.library.custom_op("hf_deepseek::mla_decode_chain", mutates_args=("storage", "length"))
def mla_decode_chain(
    x: torch.Tensor,
    w_qa: torch.Tensor,
    w_kva: torch.Tensor,
    g_q: torch.Tensor,
    eps_q: float,
    w_qb: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    g_kv: torch.Tensor,
    eps_kv: float,
    w_uk: torch.Tensor,
    storage: torch.Tensor,
    length: torch.Tensor,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference`'s results and writes, in one launch of `_mla_chain_triton._chain_kernel` on CUDA."""
    if x.shape[0] != 1 or cos.shape[0] != 1 or sin.shape[0] != 1:
        raise ValueError(f"mla_decode_chain takes one row with its cos and sin, got {x.shape[0]} and {cos.shape[0]}")
    if not x.is_cuda:
        return reference(x, w_qa, w_kva, g_q, eps_q, w_qb, cos, sin, g_kv, eps_kv, w_uk, storage, length, interleaved)
    from ._mla_chain_triton import launch

    return launch(x, w_qa, w_kva, g_q, eps_q, w_qb, cos, sin, g_kv, eps_kv, w_uk, storage, length, interleaved)


@mla_decode_chain.register_fake
def _(x, w_qa, w_kva, g_q, eps_q, w_qb, cos, sin, g_kv, eps_kv, w_uk, storage, length, interleaved):
    return x.new_empty(1, w_uk.shape[0], w_kva.shape[0]), x.new_empty(1, dtype=torch.int32)  # r + rope


__all__ = ["ENABLED", "mla_decode_chain", "reference", "usable"]
