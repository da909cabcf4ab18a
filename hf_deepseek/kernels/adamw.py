"""AdamW whose CUDA step runs at copy bandwidth: `TritonAdamW`, a `torch.optim.AdamW` whose update is one Triton
kernel per parameter (`_adamw_triton.py`) reading the parameter, its gradient and both moments once and writing the
parameter and moments once, in fp32 arithmetic between loads and stores in the tensors' own dtypes, as torch's fused
AdamW computes it.

At the training bench's shapes (4.72B bf16 parameters, bf16 moments: 66 GB moved a step) torch's fused AdamW took
26.6 ms of an H200's step (about 2.5 TB/s, docs/PERF.md 2026-12-04g), where the bytes need about 14 ms at copy
bandwidth; `benchmarks/adamw_bench.py` times both. The state keeps torch's layout (`step`, `exp_avg`, `exp_avg_sq`),
so a state_dict loads into torch's AdamW and back. Off CUDA the same update runs in torch ops (`torch_update`, what
the CPU tests check against torch's AdamW); options the kernel lacks (amsgrad, maximize, differentiable, a sparse
gradient, a complex, non-contiguous or DTensor parameter, `capturable` off CUDA) take torch's own step for the whole
optimizer. `capturable=True` keeps the step counts on the device and makes the bias corrections there, in the
kernel, so that a CUDA graph can capture the step (torch's layout for capturable AdamW; the learning rate is
captured as it is).

The weight of an FP8 layer that keeps an FP8 copy of it (`FP8Recipe.cache_weights`) is updated by a kernel that
writes the copy too (`modeling/fp8_adamw_triton.py`), where it serves.

The trainers (`DeepSeekSFTTrainer`, `DeepSeekGRPOTrainer`) use it in place of torch's AdamW for a model on CUDA
(`triton_adamw`, on by default; `use_triton_adamw`).
"""

import math

import torch

from .moe_gemv import triton_available

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def torch_update(p, g, m, v, lr_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt) -> None:
    """The kernel's update in torch ops, in place: fp32 arithmetic, results stored in each tensor's dtype."""
    p32, g32, m32, v32 = (t.float() for t in (p, g, m, v))
    p32 = p32 - lr_decay * p32
    m32 = beta1 * m32 + (1 - beta1) * g32
    v32 = beta2 * v32 + (1 - beta2) * g32 * g32
    p32 = p32 - step_size * m32 / (v32.sqrt() / bias_correction2_sqrt + eps)
    p.copy_(p32), m.copy_(m32), v.copy_(v32)


def use_triton_adamw(optim: str, device: torch.device) -> bool:
    """Whether a trainer asked for torch's AdamW (`optim` "adamw_torch" or "adamw_torch_fused", transformers'
    default) takes `TritonAdamW` instead: for parameters on CUDA where Triton imports."""
    return optim in ("adamw_torch", "adamw_torch_fused") and device.type == "cuda" and triton_available()


def _update_function(device: torch.device):
    if device.type == "cuda" and triton_available():
        from ._adamw_triton import adamw_update

        return adamw_update
    return torch_update


class TritonAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` (same arguments, decoupled weight decay) with the update in one Triton kernel per
    parameter on CUDA. Options the kernel lacks fall back to torch's step (see the module's docstring)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, capturable=False, differentiable=False, fused=None, foreach=None):  # fmt: skip
        # fused / foreach: torch's choices of its own kernels (as transformers passes them), ignored here
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, capturable=capturable, differentiable=differentiable)  # fmt: skip

    def _own_step_serves(self) -> bool:
        """Whether every parameter with a gradient can take this class's update."""
        for group in self.param_groups:
            # ("fused" / "foreach" from a loaded torch state_dict name torch's kernels: the same update here)
            if any(group.get(k) for k in ("amsgrad", "maximize", "differentiable")):
                return False
            capturable = group.get("capturable")
            if capturable and not (triton_available() and all(p.is_cuda for p in group["params"])):
                return False  # the device-step kernel: CUDA only (torch's capturable step raises elsewhere)
            if isinstance(group["lr"], torch.Tensor) and group["lr"].device.type != "cpu":
                return False
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if type(p.data) is not torch.Tensor or type(g) is not torch.Tensor:
                    return False  # DTensor (FSDP2) and other subclasses: torch's step knows them
                if g.is_sparse or p.dtype not in KERNEL_DTYPES or g.dtype != p.dtype or g.shape != p.shape:
                    return False
                if not (p.is_contiguous() and g.is_contiguous()):
                    return False
                state = self.state.get(p)
                if state and any(not state[k].is_contiguous() for k in ("exp_avg", "exp_avg_sq")):
                    return False  # moments loaded from a state_dict in another layout
                if state and capturable and state["step"].device != p.device:
                    return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._own_step_serves():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta1, beta2 = float(group["lr"]), float(group["betas"][0]), float(group["betas"][1])
            if group["capturable"]:
                self._device_step(group, lr, beta1, beta2)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p, torch.device("cpu"))
                step = float(state["step"].add_(1))
                update = _update_function(p.device)
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                hyper = (lr * group["weight_decay"], beta1, beta2, group["eps"], lr / (1 - beta1**step),
                         math.sqrt(1 - beta2**step))  # fmt: skip
                # an FP8 layer's weight with a copy to keep (`modeling/fp8_weight_cache.py`): one kernel for both
                copy = getattr(p, "fp8_copy", None)
                fused = update is not torch_update and copy is not None and copy.adamw_update(*tensors, *hyper)
                if not fused:
                    update(*tensors, *hyper)
        return loss

    def _state_of(self, p: torch.Tensor, step_device: torch.device) -> dict:
        """p's state, made at its first step in torch's AdamW layout: a float32 step count (on the CPU, or on p's
        device where `capturable`), moments like the parameter."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    def _device_step(self, group: dict, lr: float, beta1: float, beta2: float) -> None:
        """`capturable`: step counts and bias corrections on the device, nothing read on the host, so that a CUDA
        graph can capture the step and replay it (the learning rate and betas are captured as they are)."""
        from ._adamw_triton import adamw_update_device_step

        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self._state_of(p, p.device) for p in params]
        torch._foreach_add_([state["step"] for state in states], 1.0)  # one launch for every count
        for p, state in zip(params, states, strict=True):
            adamw_update_device_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr,
                                     lr * group["weight_decay"], beta1, beta2, group["eps"])  # fmt: skip
