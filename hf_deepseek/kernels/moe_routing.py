"""The MoE router for decode-sized token counts as one Triton kernel: the router's matrix-vector product, the
scores, the group-limited top-k, the gate weights and the per-expert token counts in one launch.

At batch 1 on an H200 the router's torch ops took about 40 us per MoE layer, 0.28 ms of a 1.61 ms compiled decode
step (docs/decode-h200/profile_ours-fast_b1_c2048_2026-12-04.txt): three top-k (group top-2, kept groups, experts),
each a `gatherTopK` and a `bitonicSortKVInPlace` kernel (27 us), a cuBLAS GEMV and its reduction (3.8 us), a
scatter and ~8 one-microsecond Inductor kernels (sigmoid, masks, gather, sum, the counts). Here each program
computes the logits of a block of experts for a block of tokens (fp32 products and sums, as
`F.linear(x.float(), W.float())`); the last program of a token block to finish (an atomic counter) reads them back
and routes its tokens in registers: scores, + correction bias, group scores, kept groups, top-k by repeated argmax,
weights. With several token blocks the last routing program sums the blocks' expert counts. The counters live in a
small per-device buffer that each last program puts back to zero.

`route_tokens` is a custom op (one node under torch.compile, captured by CUDA graphs): the kernel on CUDA, the
router's torch computation (`route_reference`, which `TopKRouter` itself runs) elsewhere.

Numerics against the torch router: the routing is the same computation (sigmoid as 1 / (1 + exp(-x)) with an
accurate exp and IEEE division, as torch's CUDA kernel; softmax as exp(x - max) / sum), so from the same logits
the chosen experts and the unnormalised weights agree; the kernel sums the k weights of normalisation left to right,
where torch's reduction order depends on the device (on x86 CPUs it is not left to right), so normalised weights can
differ in the last bit. Exact ties go to the lower index (which expert torch.topk returns on a tie is unspecified: the
CPU's can be any). The logits agree with cuBLAS's to fp32 rounding, not bit for bit (another summation order); with
`FUSE_MAX_TOKENS = 0` the op takes cuBLAS's logits and only routes.
"""

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .counters import counters
from .moe_gemv import rms_norm, triton_available
from .moe_gemv_config import pdl_arguments

# False (or HF_DEEPSEEK_FUSED_ROUTER=0 in the environment): the torch router everywhere (to measure it in the same run)
ENABLED = os.environ.get("HF_DEEPSEEK_FUSED_ROUTER", "1") != "0"
MAX_TOKENS = 256  # tokens up to which the router runs as the kernel (decode, speculative verification)
FUSE_MAX_TOKENS = 16  # tokens up to which the kernel computes the logits too (beyond, cuBLAS does, then the kernel)
MAX_EXPERTS, MAX_TOP_K = 512, 16  # what one program holds in registers (padded to powers of 2)
# a decode step's residual sum and post-attention RMSNorm in the router's launch (`add_norm_route_tokens`), one
# Inductor kernel fewer a MoE layer: on by default with the other launch-saving kernels (`moe_gemv.FUSED_NORM_LINEAR`'s
# note); HF_DEEPSEEK_ROUTER_ADD_NORM=0 turns it off
ADD_NORM = os.environ.get("HF_DEEPSEEK_ROUTER_ADD_NORM", "1") != "0"


def count_per_expert(flat_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (int64). A scatter-add, not `torch.bincount`, which reads the largest index back to
    the host on CUDA (a sync per MoE layer, and a graph break under torch.compile)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices, dtype=torch.long))


def sort_pairs(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [N, k] -> (order [N*k], offsets [E+1] int32): the flat (token, choice) index of each token-expert
    pair in expert order (stable: by token within an expert), expert e's pairs at order[offsets[e]:offsets[e+1]].
    On the device with static shapes and no host read; the order the grouped decode kernels' one-launch sort
    (`_moe_grouped_gemv_triton.sort_pairs`) must produce, which the tests and the interpreter check hold it to."""
    flat = indices.flatten()
    offsets = F.pad(count_per_expert(flat, num_experts).cumsum(0), (1, 0))
    return flat.argsort(stable=True), offsets.to(torch.int32)


def grouped(n_group: int, topk_group: int, topk_method: str) -> bool:
    """Whether groups limit the choice (see `configuration.TOPK_METHODS`)."""
    return topk_method != "greedy" and n_group > 1 and topk_group < n_group


class Routing(NamedTuple):
    """A router's settings (`routing_args`), in the order `route_tokens` and `launch` take them after the bias."""

    top_k: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float


def route_reference(logits: torch.Tensor, bias: torch.Tensor, *routing) -> tuple[torch.Tensor, ...]:
    """logits [N, E] (fp32), `Routing` fields -> expert indices [N, k] (int64), gate weights [N, k] (fp32), scores
    [N, E]: the router's computation in torch (differentiable through the weights and scores)."""
    r = Routing(*routing)
    scores = score(logits, r)
    return *select_experts(scores, bias, r), scores


def select_experts(scores: torch.Tensor, bias: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E] -> expert indices [N, k], gate weights [N, k]: `route_reference` after the scoring."""
    indices = choose_experts(scores, bias, r)
    return indices, gate_weights(scores, indices, r)


def score(logits: torch.Tensor, r: Routing) -> torch.Tensor:
    """The router's scores of its logits [N, E] (fp32): sigmoid (DeepSeek-V3) or softmax (V2)."""
    return logits.sigmoid() if r.scoring_func == "sigmoid" else logits.softmax(dim=-1)


def choose_experts(scores: torch.Tensor, bias: torch.Tensor, r: Routing) -> torch.Tensor:
    """scores [N, E] -> the chosen experts [N, k]: the biased scores' group-limited top-k (not differentiable)."""
    num_experts = scores.shape[-1]
    choice = scores.detach() + bias  # [N, E]: the bias only picks experts
    if grouped(r.n_group, r.topk_group, r.topk_method):
        groups = choice.view(-1, r.n_group, num_experts // r.n_group)  # [N, G, E/G]
        if r.topk_method == "group_limited_greedy":  # DeepSeek-V2: a group scores as its best expert
            group_scores = groups.amax(dim=-1)  # [N, G]
        else:  # noaux_tc (DeepSeek-V3): the sum of its two best experts
            group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)  # [N, G]
        kept = group_scores.topk(r.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = groups.masked_fill(~group_mask[..., None], float("-inf")).view(-1, num_experts)
    return choice.topk(r.top_k, dim=-1).indices  # [N, k]


def gate_weights(scores: torch.Tensor, indices: torch.Tensor, r: Routing) -> torch.Tensor:
    """The gate weights [N, k] of the chosen experts from the unbiased scores [N, E] (differentiable through them):
    normalised over the k where the config says, times the routed scaling factor."""
    weights = scores.gather(1, indices)
    if r.norm_topk_prob and r.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * r.routed_scaling_factor


def routing_args(config) -> Routing:
    """The config's routing settings, to unpack after logits and bias into `route_reference` and `route_tokens`."""
    c = config
    return Routing(
        c.num_experts_per_tok, c.n_group, c.topk_group, c.topk_method, c.scoring_func, c.norm_topk_prob,
        float(c.routed_scaling_factor),
    )  # fmt: skip


def supported(config) -> bool:
    """Whether the kernel computes this router (any `topk_method` and `scoring_func` the config allows, within the
    register budget)."""
    num_experts, n_group = config.n_routed_experts, config.n_group
    groups = n_group if grouped(n_group, config.topk_group, config.topk_method) else 1
    per_group = num_experts // groups
    padded = _next_pow2(groups) * _next_pow2(per_group)
    return (
        config.scoring_func in ("sigmoid", "softmax")
        and config.topk_method in ("noaux_tc", "group_limited_greedy", "greedy")
        and padded <= MAX_EXPERTS
        and config.num_experts_per_tok <= MAX_TOP_K
    )


def usable(router, x: torch.Tensor) -> bool:
    """Whether `route_tokens` serves a TopKRouter's x [N, d] (set-up time checks only): inference on CUDA for at
    most `MAX_TOKENS` tokens, no sequence-wise balance loss wanted (it needs the scores)."""
    config = router.config
    return (
        ENABLED
        and _kernel_device(x)
        and not torch.is_grad_enabled()
        and not (router.training and config.aux_loss_alpha > 0)
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_TOKENS
        and router.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and supported(config)
    )


def _kernel_device(x: torch.Tensor) -> bool:
    """Whether x is on a device the kernel runs on: CUDA, with Triton (settled by the first eager CUDA forward, the
    prefill, before any compiled step)."""
    return x.is_cuda and triton_available()


@torch.library.custom_op("hf_deepseek::route_tokens", mutates_args=())
def route_tokens(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    scoring_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, d], router weight [E, d], correction bias [E] -> expert indices [N, k] (int64), gate weights [N, k]
    (fp32), tokens per expert [E] (int64): `TopKRouter`'s routing of x."""
    args = Routing(top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor)
    if x.is_cuda and triton_available():
        return launch(x, weight, bias, *args)[:3]
    indices, weights, _ = route_reference(F.linear(x.float(), weight.float()), bias, *args)
    return indices, weights, count_per_expert(indices.flatten(), weight.shape[0])


@route_tokens.register_fake
def _(x, weight, bias, top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor):
    num_tokens = x.shape[0]
    return (
        x.new_empty(num_tokens, top_k, dtype=torch.long),
        x.new_empty(num_tokens, top_k, dtype=torch.float32),
        x.new_empty(weight.shape[0], dtype=torch.long),
    )


def add_norm_usable(router, norm_weight: torch.Tensor, residual: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether `add_norm_route_tokens` serves a TopKRouter after a residual [N, d] and its update delta [N, d]: where
    `route_tokens` would, `ADD_NORM` on, at most `FUSE_MAX_TOKENS` tokens (the kernel computes the logits), the
    norm's weight, the residual and delta all of one floating dtype."""
    return (
        ADD_NORM
        and usable(router, residual)
        and residual.shape[0] <= FUSE_MAX_TOKENS
        and residual.dtype == delta.dtype == norm_weight.dtype
        and residual.shape == delta.shape
    )


def add_norm_reference(
    residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, RMSNorm(residual + delta)): the decoder layer's residual sum and `layers.RMSNorm`."""
    hidden = residual + delta
    return hidden, rms_norm(hidden, norm_weight, eps)


@torch.library.custom_op("hf_deepseek::add_norm_route_tokens", mutates_args=())
def add_norm_route_tokens(
    residual: torch.Tensor,
    delta: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    scoring_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """residual, delta [N, d], the post-attention norm's weight [d] and eps, then `route_tokens`'s arguments ->
    `route_tokens` of RMSNorm(residual + delta), then that sum and the normalised rows [N, d]: in the router
    kernel's one launch on CUDA (at most `FUSE_MAX_TOKENS` tokens), `add_norm_reference` then the router's torch
    computation elsewhere."""
    args = Routing(top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor)
    if residual.is_cuda and triton_available():
        indices, weights, counts, _, hidden, normed = launch(
            residual, weight, bias, *args, fuse=True, add_norm=(delta, norm_weight, eps)
        )
        return indices, weights, counts, hidden, normed
    hidden, normed = add_norm_reference(residual, delta, norm_weight, eps)
    indices, weights, _ = route_reference(F.linear(normed.float(), weight.float()), bias, *args)
    return indices, weights, count_per_expert(indices.flatten(), weight.shape[0]), hidden, normed


@add_norm_route_tokens.register_fake
def _(residual, delta, norm_weight, eps, weight, bias, top_k, *routing):
    num_tokens = residual.shape[0]
    return (
        residual.new_empty(num_tokens, top_k, dtype=torch.long),
        residual.new_empty(num_tokens, top_k, dtype=torch.float32),
        residual.new_empty(weight.shape[0], dtype=torch.long),
        torch.empty_like(residual),
        torch.empty_like(residual),
    )


def routes_indices(router, logits: torch.Tensor) -> bool:
    """Whether `route_indices` chooses a TopKRouter's experts from its logits [N, E] (set-up time checks): any number
    of tokens on CUDA with Triton, training included (the gate weights stay torch's, differentiable)."""
    return ENABLED and _kernel_device(logits) and logits.dim() == 2 and logits.shape[0] > 0 and supported(router.config)


@torch.library.custom_op("hf_deepseek::route_indices", mutates_args=())
def route_indices(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    scoring_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> torch.Tensor:
    """logits [N, E] (fp32), correction bias [E] -> the chosen experts [N, k] (int64): `choose_experts` of the
    logits' scores, in one launch of the kernel (routing only, no counts) on CUDA, where torch's routing takes three
    top-k (about 0.43 ms a layer at 16k tokens on an H200, docs/train-h200/profiles_2026-12-04g.txt)."""
    args = Routing(top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor)
    if logits.is_cuda and triton_available():
        return launch(None, None, bias, *args, logits=logits)[0]
    return choose_experts(score(logits.float(), args), bias, args)


@route_indices.register_fake
def _(logits, bias, top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor):
    return logits.new_empty(logits.shape[0], top_k, dtype=torch.long)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _semaphores(device: torch.device) -> torch.Tensor:
    """The kernel's counters on `device` (`counters.counters`): slot 0 counts finished token blocks, slot 1 + b the
    finished expert blocks of token block b; each last program sets its slot back to 0."""
    return counters("router", 1 + MAX_TOKENS, device)


def launch(
    x, weight, bias, top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob, routed_scaling_factor,
    fuse: bool | None = None, config: tuple[int, int, int, int] | None = None, logits: torch.Tensor | None = None,
    add_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The kernel: -> indices [N, k], weights [N, k], counts [E], and the logits [N, E] it routed (fp32).
    `fuse`: whether the kernel computes the logits (default: up to `FUSE_MAX_TOKENS` tokens), else cuBLAS does.
    `config`: (BLOCK_T, BLOCK_E, BLOCK_D, warps), tokens and experts per program and the reduction chunk.
    `logits` [N, E] given (x and weight None): route them, any number of tokens, and leave counts unwritten.
    `add_norm` (delta [N, d], the norm's weight [d], eps; computing the logits): x is a residual, the routed rows
    RMSNorm(x + delta) (`add_norm_reference`); also returns the sums and the normalised rows, [N, d] each."""
    if add_norm is not None and (logits is not None or fuse is False or x.shape[0] > FUSE_MAX_TOKENS):
        raise ValueError(f"add_norm needs the kernel's own logits: at most FUSE_MAX_TOKENS={FUSE_MAX_TOKENS} tokens")
    if triton is None:
        raise RuntimeError("the router kernel needs Triton")
    given = logits is not None
    num_tokens, num_experts = logits.shape if given else (x.shape[0], weight.shape[0])
    dim = 0 if given else x.shape[1]
    if num_tokens > MAX_TOKENS and not given:
        raise ValueError(f"the router kernel takes at most MAX_TOKENS={MAX_TOKENS} tokens, got {num_tokens}")
    is_grouped = grouped(n_group, topk_group, topk_method)
    groups = n_group if is_grouped else 1
    per_group = num_experts // groups
    fuse = not given and (num_tokens <= FUSE_MAX_TOKENS if fuse is None else fuse)
    columns = _next_pow2(groups) * _next_pow2(per_group)
    block_t, block_e, block_d, warps = config or _default_config(num_tokens, dim, fuse, columns)
    token_blocks = triton.cdiv(num_tokens, block_t)
    device = logits.device if given else x.device
    indices = torch.empty(num_tokens, top_k, dtype=torch.long, device=device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    counts = torch.empty(num_experts, dtype=torch.long, device=device)
    several = token_blocks > 1 and not given
    partial = torch.empty(token_blocks, num_experts, dtype=torch.int32, device=device) if several else counts
    bias = bias.float().contiguous()
    if given:
        logits = logits.float().contiguous()
        x = weight = logits  # unread
        expert_blocks = 1
    elif fuse:
        x, weight = x.contiguous(), weight.contiguous()
        logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
        expert_blocks = triton.cdiv(num_experts, block_e)
    else:
        x, weight = x.contiguous(), weight.contiguous()
        logits = F.linear(x.float(), weight.float()).contiguous()
        expert_blocks = 1
    extra, normed_rows = {}, ()
    if add_norm is not None:
        delta, norm_weight, eps = add_norm
        hidden, normed = torch.empty_like(x), torch.empty_like(x)
        extra = dict(delta_ptr=delta.contiguous(), g_ptr=norm_weight.contiguous(), hidden_ptr=hidden,
                     normed_ptr=normed, eps=float(eps), ADD_NORM=True)  # fmt: skip
        normed_rows = (hidden, normed)
    if num_tokens == 0:
        return indices, weights, counts.zero_(), logits, *normed_rows
    _router_kernel[(token_blocks, expert_blocks)](
        x, weight, logits, bias, indices, weights, counts, partial, _semaphores(device),
        num_tokens, dim, routed_scaling_factor,
        E=num_experts, G=groups, EG=per_group, G_PAD=_next_pow2(groups), EG_PAD=_next_pow2(per_group),
        TOP_K=top_k, K_PAD=_next_pow2(top_k), TOPK_GROUP=topk_group if is_grouped else 1,
        GROUPED=is_grouped, GROUP_MAX=topk_method == "group_limited_greedy", SOFTMAX=scoring_func == "softmax",
        NORM=norm_topk_prob and top_k > 1, FUSED=fuse, ONE_BLOCK=token_blocks == 1, COUNT=not given,
        SUM_ROWS=min(_next_pow2(token_blocks), max(1, 512 // _next_pow2(num_experts))), E_PAD=_next_pow2(num_experts),
        ACCURATE=os.environ.get("TRITON_INTERPRET") != "1",  # libdevice's exp does not run in the interpreter
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=warps, **extra, **pdl_arguments(device),
    )  # fmt: skip
    return indices, weights, counts, logits, *normed_rows


def _default_config(num_tokens: int, dim: int, fuse: bool, columns: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_D, warps) for `columns` (padded) experts, untuned
    (tests/test_moe_routing.py::test_kernel_time_on_gpu times others). Routing tiles of at most 512 scores a warp
    (compiled for sm_90: up to 255 registers without spilling at 64 experts; 1024 a warp spilled 5 KB at 160).
    Fused: one expert a program (64 programs a token block at 64 experts), hidden chunks of 2048 products a warp, so
    that at batch 1 (d = 2048) a program issues all its loads at once; one warp up to 2 tokens, so that the
    routing's reductions are warp shuffles without block barriers (2 barriers, not 57 with 4 warps). Routing only:
    one warp."""
    if not fuse:
        return min(_next_pow2(num_tokens), max(1, 512 // columns)), 1, 16, 1
    block_t = min(_next_pow2(num_tokens), 16)
    warps = 1 if block_t <= 2 else 2 if block_t <= 8 else 4
    block_t = min(block_t, max(1, 512 * warps // columns))
    return block_t, 1, max(16, min(_next_pow2(dim), 2048 * warps // block_t)), warps


try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from ._pdl_triton import pdl_wait
except ImportError:  # CPU-only installs: the op's torch computation serves
    triton = None

if triton is not None:

    @triton.jit
    def _order_key(v, pos, SIZE: tl.constexpr):
        """int64 keys ordered as the fp32 values v, equal values by the lower position first: a max over keys is an
        argmax that breaks ties towards the lower index. -0.0 counts as +0.0."""
        v = tl.where(v == 0.0, 0.0, v)
        bits = v.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
        return (bits.to(tl.int64) << 32) | (SIZE - 1 - pos).to(tl.int64)

    @triton.jit
    def _router_kernel(
        x_ptr, w_ptr, logits_ptr, bias_ptr, idx_ptr, wt_ptr, counts_ptr, partial_ptr, sem_ptr, N, D, scale,
        E: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, G_PAD: tl.constexpr, EG_PAD: tl.constexpr,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUPED: tl.constexpr,
        GROUP_MAX: tl.constexpr, SOFTMAX: tl.constexpr, NORM: tl.constexpr, FUSED: tl.constexpr,
        ONE_BLOCK: tl.constexpr, SUM_ROWS: tl.constexpr, E_PAD: tl.constexpr, ACCURATE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
        COUNT: tl.constexpr = True, delta_ptr=None, g_ptr=None, hidden_ptr=None, normed_ptr=None, eps=0.0,
        ADD_NORM: tl.constexpr = False,
    ):  # fmt: skip
        """Program (b, j): with FUSED, logits[tokens of b, experts of j] = x @ W^T (fp32), then the last of token
        block b's programs routes its tokens; without, one program per token block routes the given logits. COUNT:
        the tokens per expert too. PDL: `_pdl_triton.pdl_wait`'s. ADD_NORM (with FUSED): x is the residual; the
        routed rows are RMSNorm(x + delta) with weight g, rounded as the eager ops round them (the sum to x's dtype,
        the normalised rows to it, their product with g again); programs (b, 0) store the sums (hidden) and the
        normalised rows (normed), which every program of the block recomputes from cache."""
        pdl_wait(PDL)
        MIN_KEY: tl.constexpr = -9223372036854775807  # below every value's key: taken or absent
        C: tl.constexpr = G_PAD * EG_PAD  # the routing tile's columns: groups side by side, each padded
        tb = tl.program_id(0)
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < N
        last = True
        if FUSED:
            e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
            e_ok = e < E
            acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
            if ADD_NORM:
                dtype = x_ptr.dtype.element_ty
                squares = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    at = t[:, None] * D + d[None, :]
                    ok = t_ok[:, None] & (d < D)[None, :]
                    h = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
                    h = (h + tl.load(delta_ptr + at, mask=ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
                    squares += h * h
                rstd = tl.rsqrt(tl.sum(squares, axis=1) / D + eps)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                if ADD_NORM:
                    at = t[:, None] * D + d[None, :]
                    ok = t_ok[:, None] & d_ok[None, :]
                    h = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
                    h = (h + tl.load(delta_ptr + at, mask=ok, other=0.0).to(tl.float32)).to(dtype)
                    normed = (h.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
                    g = tl.load(g_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
                    xs = (g[None, :] * normed).to(dtype)
                    if tl.program_id(1) == 0:
                        tl.store(hidden_ptr + at, h, mask=ok)
                        tl.store(normed_ptr + at, xs, mask=ok)
                else:
                    xs = tl.load(x_ptr + t[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
                ws = tl.load(w_ptr + e[:, None] * D + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
                acc += tl.sum(xs.to(tl.float32)[:, None, :] * ws.to(tl.float32)[None, :, :], axis=2)
            tl.store(logits_ptr + t[:, None] * E + e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
            tl.debug_barrier()  # every thread's logits stored before thread 0's release below
            done = tl.atomic_add(sem_ptr + 1 + tb, 1, sem="acq_rel", scope="gpu")
            last = done == tl.num_programs(1) - 1
        if last:
            if FUSED:
                tl.store(sem_ptr + 1 + tb, 0)  # every expert block has counted: ready for the next launch
            c = tl.arange(0, C)
            expert = (c // EG_PAD) * EG + c % EG_PAD
            valid = (c // EG_PAD < G) & (c % EG_PAD < EG)
            logits = tl.load(
                logits_ptr + t[:, None] * E + expert[None, :], mask=t_ok[:, None] & valid[None, :], other=0.0,
                cache_modifier=".cg",
            ).to(tl.float32)  # fmt: skip
            logits = tl.where(valid[None, :], logits, float("-inf"))
            if SOFTMAX:
                shifted = logits - tl.max(logits, axis=1)[:, None]
                exps = libdevice.exp(shifted) if ACCURATE else tl.exp(shifted)
                scores = tl.div_rn(exps, tl.sum(exps, axis=1)[:, None])
            else:
                exps = libdevice.exp(-logits) if ACCURATE else tl.exp(-logits)
                scores = tl.div_rn(tl.full(logits.shape, 1.0, tl.float32), 1.0 + exps)
            bias = tl.load(bias_ptr + expert, mask=valid, other=0.0)
            choice = tl.where(valid[None, :], scores + bias[None, :], float("-inf"))
            if GROUPED:
                c3 = tl.reshape(choice, [BLOCK_T, G_PAD, EG_PAD])
                top1 = tl.max(c3, axis=2)
                if GROUP_MAX or EG == 1:
                    group_scores = top1
                else:  # the sum of the two best: the best, then the best of the rest (one tied value counts twice)
                    k3 = tl.reshape(_order_key(choice, c, C), [BLOCK_T, G_PAD, EG_PAD])
                    first = tl.max(k3, axis=2)
                    top2 = tl.max(tl.where(k3 == first[:, :, None], float("-inf"), c3), axis=2)
                    group_scores = top1 + top2
                g = tl.arange(0, G_PAD)
                gkey = tl.where(g[None, :] < G, _order_key(group_scores, g, G_PAD), MIN_KEY)
                kept = tl.zeros([BLOCK_T, G_PAD], dtype=tl.int32)
                for _ in tl.static_range(TOPK_GROUP):
                    hit = gkey == tl.max(gkey, axis=1)[:, None]
                    kept = kept | hit.to(tl.int32)
                    gkey = tl.where(hit, MIN_KEY, gkey)
                kept_c = tl.reshape(tl.broadcast_to(kept[:, :, None], [BLOCK_T, G_PAD, EG_PAD]), [BLOCK_T, C])
                choice = tl.where(kept_c != 0, choice, float("-inf"))
            key = tl.where(valid[None, :], _order_key(choice, c, C), MIN_KEY)
            k = tl.arange(0, K_PAD)
            out_idx = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
            out_w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            for i in tl.static_range(TOP_K):
                best = tl.max(key, axis=1)
                pos = C - 1 - best.to(tl.int32)  # the low 32 bits: the position
                hit = c[None, :] == pos[:, None]
                w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
                chosen_expert = ((pos // EG_PAD) * EG + pos % EG_PAD).to(tl.int64)
                out_idx = tl.where(k[None, :] == i, chosen_expert[:, None], out_idx)
                out_w = tl.where(k[None, :] == i, w[:, None], out_w)
                total += w  # left to right
                key = tl.where(hit, MIN_KEY, key)
            if NORM:
                out_w = tl.div_rn(out_w, (total + 1e-20)[:, None])
            out_w = out_w * scale
            out_mask = t_ok[:, None] & (k[None, :] < TOP_K)
            tl.store(idx_ptr + t[:, None] * TOP_K + k[None, :], out_idx, mask=out_mask)
            tl.store(wt_ptr + t[:, None] * TOP_K + k[None, :], out_w, mask=out_mask)
            chosen = (key == MIN_KEY) & valid[None, :] & t_ok[:, None]
            block_counts = tl.sum(chosen.to(tl.int32), axis=0)  # [C]
            if COUNT:  # not for given logits (training), whose caller counts the tokens itself
                if ONE_BLOCK:
                    tl.store(counts_ptr + expert, block_counts.to(tl.int64), mask=valid)
                else:
                    tl.store(partial_ptr + tb * E + expert, block_counts, mask=valid)
                    tl.debug_barrier()
                    blocks_done = tl.atomic_add(sem_ptr, 1, sem="acq_rel", scope="gpu")
                    if blocks_done == tl.num_programs(0) - 1:  # the last token block: sum every block's counts
                        tl.store(sem_ptr, 0)
                        cols = tl.arange(0, E_PAD)
                        total_counts = tl.zeros([E_PAD], dtype=tl.int32)
                        for r0 in range(0, tl.num_programs(0), SUM_ROWS):
                            rows = r0 + tl.arange(0, SUM_ROWS)
                            part = tl.load(
                                partial_ptr + rows[:, None] * E + cols[None, :],
                                mask=(rows < tl.num_programs(0))[:, None] & (cols < E)[None, :], other=0,
                                cache_modifier=".cg",
                            )  # fmt: skip
                            total_counts += tl.sum(part, axis=0)
                        tl.store(counts_ptr + cols, total_counts.to(tl.int64), mask=cols < E)


__all__ = [
    "route_tokens", "route_indices", "routes_indices", "route_reference", "select_experts", "choose_experts",
    "add_norm_route_tokens", "add_norm_reference", "add_norm_usable", "ADD_NORM",
    "gate_weights", "score", "routing_args", "Routing", "count_per_expert", "grouped",
    "sort_pairs", "supported", "usable", "launch", "ENABLED", "MAX_TOKENS", "FUSE_MAX_TOKENS",
]  # fmt: skip
