"""Per-head products of decode attention's absorbed weights through one Triton kernel each: the query's nope part
through W_UK into latent space, the latent output through W_UV back to each head's values, for the few query rows
of a decode step (HF_DEEPSEEK_HEAD_MATMUL=1; opt-in: level with cuBLAS in the bench's step, 1.14 against 1.13 ms at
batch 1 / 2k and 3.25 against 3.25 at 32 / 2k, bench row `ours-fast-head-matmul`, H200, docs/PERF.md 2026-12-05).

At batch 1 on an H200 cuBLAS's batched products for these took 3.4 and 3.2 us a layer to read 2 MB of weights each
(`nvjet_sm90_tst_64x8_64x16_2x1` TNT and NNT in
docs/decode-h200/profile_ours-fast-linear-gemv_b1_c2048_2026-12-04g.txt), 53 us of a 1.11 ms step over 8 layers,
where reading the bytes takes under 1 us. Here (`_head_matmul_triton.py`) a program owns one head's block of
outputs, so about one program per multiprocessor reads each weight once. `head_matmul` is a custom op (one node
under torch.compile, captured by CUDA graphs): the kernel on CUDA, the product in torch elsewhere (fp32 sums
rounded once to x's dtype, as the kernel stores them; what the CPU tests run)."""

import os

import torch

from .moe_gemv import triton_available

ENABLED = os.environ.get("HF_DEEPSEEK_HEAD_MATMUL", "0") == "1"
MAX_ROWS = 64  # query rows (batch x tokens) up to which the kernel serves; cuBLAS above


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `head_matmul` serves x [T, H, K] @ w [H, K, N] (set-up time checks): switched on, CUDA with Triton,
    bf16 or fp16 in both, no grad mode, at most MAX_ROWS rows."""
    half = (torch.bfloat16, torch.float16)
    return (
        ENABLED
        and x.is_cuda
        and triton_available()
        and x.dtype in half
        and w.dtype == x.dtype
        and not torch.is_grad_enabled()
        and x.shape[0] <= MAX_ROWS
    )


@torch.library.custom_op("hf_deepseek::head_matmul", mutates_args=())
def head_matmul(x: torch.Tensor, w: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H, K] @ w [H, K, N] per head -> [T, H, N] in x's dtype (fp32 sums rounded once); with `tail`
    [T, H, R] the product joined with it, [T, H, N + R]."""
    if not x.is_cuda:
        out = torch.einsum("thk,hkn->thn", x.float(), w.float()).to(x.dtype)
        return out if tail is None else torch.cat([out, tail.to(x.dtype)], dim=-1)
    from ._head_matmul_triton import launch

    return launch(x, w, tail)


@head_matmul.register_fake
def _(x, w, tail=None):
    return x.new_empty(x.shape[0], x.shape[1], w.shape[2] + (0 if tail is None else tail.shape[2]))


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor, q_rope: torch.Tensor | None = None) -> torch.Tensor:
    """q_nope [B, H, T, nope] through W_UK [H, nope, r] -> [B, H, T, r] in q_nope's dtype, joined with q_rope
    [B, H, T, rope] when given ([B, H, T, r + rope], the query of absorbed attention): the kernel for few rows
    (`usable`; the rope part copied in by the same launch), torch's einsum and concatenation otherwise."""
    w_uk = w_uk.to(q_nope.dtype)
    bsz, heads, q_len, nope = q_nope.shape
    if ENABLED and bsz * q_len <= MAX_ROWS:
        rows = q_nope.transpose(1, 2).reshape(bsz * q_len, heads, nope)
        if usable(rows, w_uk):
            tail = None if q_rope is None else q_rope.to(q_nope.dtype).transpose(1, 2).reshape(bsz * q_len, heads, -1)
            return head_matmul(rows, w_uk, tail).view(bsz, q_len, heads, -1).transpose(1, 2)
    q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
    return q_latent if q_rope is None else torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)


def values_from_latent(out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """The attention output in latent space [B, H, T, r] through W_UV [H, v, r] -> [B, T, H, v] in its dtype: the
    kernel for few rows (`usable`), torch's einsum otherwise."""
    w_uv = w_uv.to(out_latent.dtype)
    bsz, heads, q_len, rank = out_latent.shape
    if ENABLED and bsz * q_len <= MAX_ROWS:
        rows = out_latent.transpose(1, 2).reshape(bsz * q_len, heads, rank)
        w = w_uv.transpose(1, 2)  # [H, r, v], a view
        if usable(rows, w):
            return head_matmul(rows, w).view(bsz, q_len, heads, -1)
    return torch.einsum("bhtr,hvr->bthv", out_latent, w_uv)


__all__ = ["ENABLED", "MAX_ROWS", "absorb_query", "head_matmul", "usable", "values_from_latent"]
