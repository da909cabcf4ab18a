"""Small building blocks shared by the network: RMSNorm and the SwiGLU feed-forward (dense layers, shared experts)."""

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..kernels.moe_gemv import rms_norm
from .decode_linear import fused_gate_up
from .joined_projections import joined_projections


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as DeepSeek does, then cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLUMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense MLP of the first layers and the always-on shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.gate_proj, "swiglu_mlp", None)  # FP8 training layers: the MLP in one function
        out = fused(self, x) if fused is not None else None  # (None where that does not serve)
        if out is not None:
            return out
        act = fused_gate_up(self, x)  # a decode row in one launch, else None
        if act is None:
            joined = joined_projections(self.gate_proj, self.up_proj, x)  # training, opt-in: one GEMM for both
            gate, up = joined if joined is not None else (self.gate_proj(x), self.up_proj(x))
            act = self.act_fn(gate) * up
        return self.down_proj(act)
