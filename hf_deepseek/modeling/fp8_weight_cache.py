"""FP8 copies of the training weights, quantised once per optimizer step (`FP8Recipe.cache_weights`).

Without them every forward quantises every FP8 weight afresh (a read of the bf16 weight, a write of its FP8 rows; the
routed experts' weights also fold their columns' amaxes, which the input gradient quantises W^T with): at the
training bench's shapes 4.7 ms a step for the experts' weights alone (H100 profile, 2026-12-06), for weights that
change once a step, when the optimizer writes them. With `cache_weights` each FP8 layer keeps an `FP8WeightCopy`
per weight: the FP8 rows, their scales and (for the experts) the column amaxes, as the backend's
`quantize_weight_and_amax_t` makes them; for the blockwise recipe W's 128x128 blocks, their scales and W^T's FP8
values (the same blocks transposed, which the input gradient reads), where every forward made W's blocks and every
backward transposed them. `kernels.adamw.TritonAdamW` writes the copy in its update of the weight on CUDA
(`fp8_adamw_triton.py`: the new weight's rows, or its 128x128 blocks, quantised from the registers that hold them),
so the step reads each weight once for both. Anything else that changes a weight (another optimizer, loading a
state_dict, moving the model) leaves its copy stale, and the copy is quantised afresh before a forward uses it: by
the layer when it runs eagerly, by a forward pre-hook on the converted model when its layers run compiled (Dynamo
cannot read a tensor's version counter). Stale: the weight's version counter, storage, shape or dtype differ from
those the copy was made from. Gradient accumulation reuses a copy over its micro-batches.

Measured on an H100 (docs/PERF.md, 2026-12-06): at one micro-batch a step the rowwise bench step is 4% slower with
copies; the update that also folds the experts' column amaxes runs at about 60% of the plain update's bandwidth.
The blockwise copy (no amax across programs) is not yet measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import increment_version


@dataclass(eq=False)
class FP8WeightCopy:
    """The FP8 operands of one weight W [(E,) N, K]. Rowwise: `q` [(E,) N, Kp] and `scale` [(E,) N, 1] (W's rows),
    `amax_t` [(E,) Kp] (its columns' amaxes: W^T's rows', where the backend takes them from W's pass; else None).
    Blockwise: `q` [(E,) Np, Kp], `scale` [(E,) Np/128, Kp/128] and `q_t` [(E,) Kp, Np], W^T's FP8 values."""

    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    amax_t: torch.Tensor | None = None
    pow2: bool = False
    made_from: tuple = ()
    q_t: torch.Tensor | None = None

    @staticmethod
    def _source(w: torch.Tensor) -> tuple:
        return w._version, w.data_ptr(), w.device, w.shape, w.dtype

    def is_fresh_for(self, w: torch.Tensor) -> bool:
        return self.made_from == self._source(w)

    def fill(self, backend, w: torch.Tensor) -> None:
        """Quantise W afresh with the backend's quantiser."""
        with torch.no_grad():
            self.q, self.scale, self.amax_t = backend.quantize_weight_and_amax_t(w.detach())
            self.q_t = None if backend.rowwise else backend.quantize_weight_t(w.detach(), self.q, self.scale)[0]
        self.pow2 = backend.pow2
        self.made_from = self._source(w)

    def adamw_update(self, p, g, m, v, *hyper) -> bool:
        """`kernels.adamw.TritonAdamW`'s update of p that writes this copy of the new p as well, where the fused
        kernel serves (CUDA, the copy made on p's device by the Triton quantiser; rowwise, rows of at most 4096
        values); False, nothing done, elsewhere."""
        from .fp8_adamw_triton import adamw_update_fp8, fusable

        if not fusable(p, g, m, v, self):
            return False
        adamw_update_fp8(p, g, m, v, *hyper, self)
        increment_version(p)  # as an in-place torch update would: the copy is of this version
        self.made_from = self._source(p)
        return True


def weight_operands(backend, weight: torch.Tensor, transpose_too: bool, copy: FP8WeightCopy | None):
    """The FP8 operands of W for an FP8 GEMM and what `backend.quantize_weight_t` takes for W^T: the layer's copy of
    them where it keeps one (W^T's column amaxes, or W^T's blocks), else backend.quantize_weight(W) and, when the
    input gradient needs W^T, the amaxes its quantisation takes."""
    if copy is not None:
        return copy.q, copy.scale, copy.amax_t if backend.rowwise else copy.q_t
    return backend.quantize_weight_and_amax_t(weight) if transpose_too else (*backend.quantize_weight(weight), None)


def weight_copy(module: nn.Module, name: str, backend) -> FP8WeightCopy | None:
    """The layer's copy of its weight `name` (None without `cache_weights`), made fresh first when running eagerly;
    compiled layers rely on `refresh_weight_copies`, the converted model's forward pre-hook."""
    copies = getattr(module, "fp8_weight_copies", None)
    if not copies:
        return None
    copy = copies[name]
    if not torch.compiler.is_compiling():
        w = getattr(module, name)
        if not copy.is_fresh_for(w):
            copy.fill(backend, w)
    return copy


def attach_weight_copies(module: nn.Module, names: tuple[str, ...]) -> None:
    """Give an FP8 layer a copy of each named weight, quantised at its first use, and link each weight to its copy for
    the optimizer (`param.fp8_copy`)."""
    module.fp8_weight_copies = {name: FP8WeightCopy() for name in names}
    for name, copy in module.fp8_weight_copies.items():
        getattr(module, name).fp8_copy = copy


def detach_weight_copies(module: nn.Module) -> None:
    for name in getattr(module, "fp8_weight_copies", {}):
        param = getattr(module, name)
        if hasattr(param, "fp8_copy"):
            del param.fp8_copy
    module.__dict__.pop("fp8_weight_copies", None)


@torch.compiler.disable  # eager even inside a compiled model: it reads version counters, which Dynamo cannot
def refresh_weight_copies(model: nn.Module, backend_of) -> None:
    """Quantise afresh every stale copy of the model's FP8 layers (`backend_of(module, weight)`: the layer's
    backend for the weight's device)."""
    for module in model.modules():
        for name, copy in getattr(module, "fp8_weight_copies", {}).items():
            w = getattr(module, name)
            if not copy.is_fresh_for(w):
                copy.fill(backend_of(module, w), w)
