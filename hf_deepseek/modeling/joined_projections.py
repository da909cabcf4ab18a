"""Two projections of the same input in one GEMM while training: MLA's q_a and kv_a (both read the layer's normed
hidden state), an MLP's gate and up (dense MLP and shared experts). Their weights are joined for the step (a copy of
a few MB a layer) and the output split, so a training step runs one larger GEMM instead of two in the forward, the
input gradient and the weight gradient, and an FP8 step quantises the shared input and its transpose once instead of
twice (docs/train-h200/fp8_quant_census_2026-12-04g.txt: "x of ... again in ...") and both output gradients in one
launch per orientation.

The rowwise FP8 recipe takes it (`FP8Recipe.joined_projections`: its step 3.4 ms, 1.8%, faster on an H200,
docs/PERF.md 2026-12-07); for bf16 it is opt-in (`HF_DEEPSEEK_JOINED_PROJECTIONS=1`, bench variants
`*-joined-projections`: a bf16 step 2% slower on an H100, the joined weight's copy and its gradient's split costing
more than the GEMMs save). The parameters stay the two modules' own (checkpoints, optimizers and PEFT see no change);
only training-mode forwards with gradients take the joined GEMM, of two modules of the same kind: plain `nn.Linear`s
without bias (also once generate() has made them `DecodeLinear`s, as in GRPO between rollouts), or two FP8 linears of
one recipe (`linear_with_weight`). Decode keeps its own fused launch (`decode_linear.fused_pair`).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from .decode_linear import DecodeLinear

ENABLED = os.environ.get("HF_DEEPSEEK_JOINED_PROJECTIONS", "0") == "1"


def joined_projections(first: nn.Module, second: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """(first(x), second(x)) from one GEMM over their joined weights, or None where that does not serve (switched
    off, not training with gradients, biases, modules of another kind or of different FP8 recipes)."""
    wanted = ENABLED or getattr(getattr(first, "fp8_recipe", None), "joined_projections", False)
    if not (wanted and first.training and torch.is_grad_enabled()):
        return None
    if type(first) is not type(second) or first.bias is not None or second.bias is not None:
        return None
    if type(first) in (nn.Linear, DecodeLinear):  # DecodeLinear: an nn.Linear generate() gave its decode kernels
        linear = F.linear
    else:
        linear = getattr(first, "linear_with_weight", None)
        # one recipe object (as `convert_to_fp8_training` sets it): an identity test, which Dynamo folds at trace time
        if linear is None or getattr(first, "fp8_recipe", None) is not getattr(second, "fp8_recipe", None):
            return None
    weight = torch.cat([first.weight, second.weight])
    return linear(x, weight).split([first.weight.shape[0], second.weight.shape[0]], dim=-1)


__all__ = ["ENABLED", "joined_projections"]
