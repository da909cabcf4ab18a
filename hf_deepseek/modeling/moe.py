"""DeepSeekMoE: sigmoid router with group-limited top-k and a selection-only correction bias, routed experts
stored stacked and run with a grouped GEMM, always-on shared experts, and the balancing statistics.

The router records each forward's per-expert token counts (`last_expert_load`) for aux-loss-free balancing
(the trainers move `e_score_correction_bias` with them) and, when `aux_loss_alpha` > 0, the sequence-wise
balance loss of DeepSeek-V3 (Eq. 17-20). Inference on CUDA for decode-sized token counts routes with one Triton
kernel instead of the torch ops (`kernels/moe_routing.py`, the same computation).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..configuration import DeepSeekConfig
from ..kernels import moe_routing
from ..kernels.moe_routing import count_per_expert
from .layers import SwiGLUMLP
from .moe_decode import decode_experts, routed_and_shared_experts

GROUPED_GEMM_DEVICES = ("cuda",)  # where torch's grouped GEMM is fast (the CPU tests add "cpu" to check its numerics)


def autocast_bf16(x: torch.Tensor) -> bool:
    """Whether bf16 autocast is on for x's device (mixed precision over fp32 weights, as the Trainer's `bf16=True`)."""
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


class TopKRouter(nn.Module):
    """Scores experts in fp32 (sigmoid: V3; softmax: V2); the bias only picks experts, the gate weights come from
    the unbiased scores; `topk_method` says how groups limit the choice (see `configuration.TOPK_METHODS`)."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.last_expert_load: torch.Tensor | None = None  # [E] token counts of the latest forward
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] (N = batch_size * T tokens) -> expert indices [N, k], gate weights [N, k] (fp32)."""
        cfg = self.config
        if moe_routing.usable(self, x):  # decode-sized inference on CUDA: one Triton kernel (kernels/moe_routing.py)
            indices, weights, self.last_expert_load = moe_routing.route_tokens(
                x, self.weight, self.e_score_correction_bias, *moe_routing.routing_args(cfg)
            )
            self.last_aux_loss = None
            return indices, weights
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        routing = moe_routing.routing_args(cfg)
        if moe_routing.routes_indices(self, logits):  # CUDA, training included: the kernel chooses the experts
            scores = moe_routing.score(logits, routing)
            indices = moe_routing.route_indices(logits.detach(), self.e_score_correction_bias, *routing)
            weights = moe_routing.gate_weights(scores, indices, routing)
        else:
            indices, weights, scores = moe_routing.route_reference(logits, self.e_score_correction_bias, *routing)

        self.last_expert_load = count_per_expert(indices.flatten().detach(), self.num_experts)
        self.last_aux_loss = None
        if cfg.aux_loss_alpha > 0 and self.training:
            self.last_aux_loss = self.sequence_balance_loss(scores, indices, batch_size)
        return indices, weights

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, batch_size: int) -> torch.Tensor:
        """alpha * sum_i f_i * P_i per sequence, averaged over sequences (DeepSeek-V3 Eq. 17-20)."""
        num_experts, top_k = self.num_experts, self.top_k
        scores = scores.view(batch_size, -1, num_experts)  # [B, T, E]
        seq_len = scores.shape[1]
        probs = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}: affinities normalised per token
        selected = F.one_hot(indices.view(batch_size, -1), num_experts).sum(dim=1).float()  # [B, E]
        f = selected * num_experts / (top_k * seq_len)
        p = probs.mean(dim=1)
        return self.config.aux_loss_alpha * (f * p).sum(dim=-1).mean()


class GatherTokenRows(torch.autograd.Function):
    """x [N, d] -> x[order // k] [N*k, d]: each token's row once per chosen expert, in expert order.

    Backward un-sorts the gradient with the inverse permutation and sums each token's k rows: a gather and a
    sum, where autograd's backward of the indexing would scatter-add rows with atomics (slow in bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x[order // top_k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class PermuteRows(torch.autograd.Function):
    """rows[perm] for a permutation `perm` whose inverse is `inverse`; backward is grad[inverse], a gather too."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows[perm]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class RoutedExperts(nn.Module):
    """All routed experts of a layer as stacked tensors: gate_up_proj [E, 2I, d], down_proj [E, d, I]."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        num_experts, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], indices/weights [N, k] -> sum_k weight_k * expert_k(x) [N, d]."""
        num_tokens, top_k = indices.shape
        decode = decode_experts(self, x, top_k, grouped_gemm=self._grouped_gemm_ok(x))  # moe_decode.py
        if decode is not None:  # inference on decode-sized batches, or under torch.compile: static shapes
            return decode(self, x, indices, weights)
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # token-choice pairs sorted by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = count_per_expert(flat, self.num_experts)
        x_sorted = GatherTokenRows.apply(x, order, inverse, top_k)  # [N*k, d]
        out = self._sorted_experts(x_sorted, counts)
        out = PermuteRows.apply(out, inverse, order).view(num_tokens, top_k, -1)  # back to (token, choice) order
        return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(x.dtype)

    def _grouped_gemm_ok(self, x: torch.Tensor) -> bool:
        """torch's grouped GEMM dispatches for bf16 on CUDA with 16-byte aligned rows; else the exact loop."""
        dims_ok = all(s % 8 == 0 for s in (*self.gate_up_proj.shape[1:], self.down_proj.shape[2]))
        return (
            hasattr(F, "grouped_mm")
            and x.device.type in GROUPED_GEMM_DEVICES
            and dims_ok
            and (x.dtype == torch.bfloat16 or autocast_bf16(x))
        )

    def _sorted_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows [R, d] sorted by expert, `counts` [E] rows each -> each row through its expert [R, d]: the grouped
        GEMM where it is fast (bf16 CUDA, or fp32 weights under bf16 autocast: in bf16, as autocast runs a linear
        layer), else the per-expert loop."""
        if self._grouped_gemm_ok(x_sorted):
            bf16 = torch.bfloat16  # autocast leaves grouped_mm alone: cast as it casts a linear layer's operands
            offs = counts.cumsum(0).to(torch.int32)
            gate_up, down = self.gate_up_proj.to(bf16).transpose(1, 2), self.down_proj.to(bf16).transpose(1, 2)
            gate, up = F.grouped_mm(x_sorted.to(bf16), gate_up, offs=offs).chunk(2, dim=-1)
            return F.grouped_mm(self.act_fn(gate) * up, down, offs=offs)
        return self._loop_experts(x_sorted, counts)

    @torch.compiler.disable  # under torch.compile it runs eagerly: a graph break, but no graph specialised on counts
    def _loop_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One GEMM pair per expert over its rows (the counts read on the host; an expert without rows gets an
        empty product). Inference under torch.compile takes `moe_decode`'s static-shape paths instead."""
        outputs = []
        for expert, chunk in enumerate(x_sorted.split(counts.tolist())):
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(self.act_fn(gate) * up, self.down_proj[expert]))
        return torch.cat(outputs)


class DeepSeekMoE(nn.Module):
    """Shared experts (always on) + top-k routed experts."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            SwiGLUMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.hidden_act)
            if config.n_shared_experts > 0
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, routes: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`routes`: (indices, weights) the router already chose for these tokens (`route_after_attention`)."""
        bsz, seq_len, dim = hidden_states.shape
        flat = hidden_states.reshape(-1, dim)
        indices, weights = self.gate(flat, bsz) if routes is None else routes
        both = routed_and_shared_experts(self, flat, indices, weights)  # decode, opt-in: one pair of launches for all
        if both is not None:
            return both.view(bsz, seq_len, dim)
        out = self.experts(flat, indices, weights).view(bsz, seq_len, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out

    def route_after_attention(self, norm, residual: torch.Tensor, attn_out: torch.Tensor) -> tuple | None:
        """A decode step's residual sum, the post-attention RMSNorm `norm` and this layer's routing in the router
        kernel's one launch (`moe_routing.ADD_NORM`) -> (hidden, normed [B, T, d], routes for `forward`); None
        where that launch does not serve (the caller then adds, normalises and calls `forward` itself)."""
        dim = residual.shape[-1]
        flat, delta = residual.reshape(-1, dim), attn_out.reshape(-1, dim)
        if not moe_routing.add_norm_usable(self.gate, norm.weight, flat, delta):
            return None
        gate = self.gate
        indices, weights, gate.last_expert_load, hidden, normed = moe_routing.add_norm_route_tokens(
            flat, delta, norm.weight, norm.eps, gate.weight, gate.e_score_correction_bias,
            *moe_routing.routing_args(gate.config),
        )  # fmt: skip
        gate.last_aux_loss = None
        return hidden.view_as(residual), normed.view_as(residual), (indices, weights)
