"""What the DeepSeek trainers add to TRL's: the model's own MTP and balance losses, and aux-loss-free balancing.

TRL 1.16 patches `model.forward` with a fused LM head that runs only the backbone, so the MTP loss and the
sequence-wise balance loss, which `DeepSeekForCausalLM.forward` computes after the backbone, would never be
trained. `DeepSeekLossesMixin` keeps TRL's loss and metrics untouched and wraps TRL's fused forward once more: a
hook captures what the backbone returned, and the wrapper computes the MTP loss (the model's own code) and the
routers' balance loss from it inside the same forward call, so DDP and FSDP see every parameter used there.
`compute_loss` then adds `mtp_loss_weight * MTP loss + balance loss`. The mixin also owns the
`RouterBiasBalancer` and merges the balance metrics into the logs.
"""

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput

from hf_deepseek.kernels.adamw import TritonAdamW, use_triton_adamw
from hf_deepseek.modeling import DeepSeekForCausalLM
from hf_deepseek.modeling.compile_regions import compile_for_training
from hf_deepseek.trainers.balancing import RouterBiasBalancer
from hf_deepseek.trainers.nonfinite import NonFiniteGuard

# backbone keyword arguments that `DeepSeekForCausalLM._mtp_loss` takes by name or must not receive
_MTP_NAMED = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
_NOT_FOR_MTP = ("use_cache", "cache", "past_key_values", "output_hidden_states", "output_router_logits")


@dataclass
class DeepSeekTrainingFields:
    """Fields shared by `DeepSeekSFTConfig` and `DeepSeekGRPOConfig`."""

    mtp_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Weight (lambda) of the MTP loss; None takes the model config's `mtp_loss_weight`."},
    )
    mtp_loss_weight_final: float | None = field(
        default=None,
        metadata={
            "help": "MTP weight after the fraction `mtp_loss_weight_switch` of the run (DeepSeek-V3: 0.3, then 0.1 "
            "for the last 4.8T of 14.8T tokens); None keeps `mtp_loss_weight` throughout."
        },
    )
    mtp_loss_weight_switch: float = field(
        default=0.68, metadata={"help": "Fraction of max_steps at which the MTP weight becomes the final weight."}
    )
    router_bias_update_speed: float = field(
        default=1e-3,
        metadata={"help": "Gamma of aux-loss-free balancing: how far each router bias moves per optimizer step."},
    )
    router_bias_update_schedule: str = field(
        default="constant",
        metadata={"help": "'constant' (gamma, then 0 from router_bias_update_end) or 'linear' (decay to 0)."},
    )
    router_bias_update_end: float = field(
        default=1.0, metadata={"help": "Fraction of max_steps from which gamma is 0 (DeepSeek-V3 about 0.97)."}
    )
    nonfinite_action: str = field(
        default="none",
        metadata={
            "help": "When a step's loss or gradient is NaN/inf, before the update (`trainers/nonfinite.py`): 'stop' "
            "(raise, naming the step, the parameter and the last checkpoint), 'skip' (drop that update) or 'none' "
            "(the Trainer's behaviour: apply it)."
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each decoder / MTP layer (regional compilation, `modeling/compile_regions.py`): "
            "fused norms, RoPE, router and SwiGLU; 1.3x on the H200 benchmark step (docs/PERF.md)."
        },
    )
    triton_adamw: bool = field(
        default=True,
        metadata={
            "help": "Where `optim` is torch's AdamW (the default) and the model is on CUDA, update with "
            "`kernels.adamw.TritonAdamW`: the same AdamW in one Triton kernel per parameter, 1.29x torch's fused "
            "AdamW at the training bench's 4.7B parameters (docs/PERF.md). False keeps torch's."
        },
    )


@dataclass
class DeepSeekFusedOutput(FusedCausalLMOutput):
    """TRL's fused-head output plus the own losses, as fields: DDP rebuilds outputs from their fields."""

    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


@dataclass
class _Capture:
    kwargs: dict[str, Any]
    hidden_states: torch.Tensor  # the backbone's final (normed) hidden states
    aux_losses: list[torch.Tensor]
    mtp_loss: torch.Tensor | None = None  # set by the forward wrapper
    balance_loss: torch.Tensor | None = None


class DeepSeekLossesMixin:
    """Mixed into a TRL trainer before it in the MRO; call `_setup_deepseek()` at the end of `__init__`."""

    def _setup_deepseek(self) -> None:
        model = self.deepseek_model
        if getattr(self.args, "compile_layers", False):
            compile_for_training(model, loss=False)  # TRL computes the main loss itself
        self._captures: list[_Capture] = []
        self._capturing = False
        self._routers = model.routers()
        model.model.register_forward_hook(self._capture_backbone, with_kwargs=True)
        self._wrap_fused_forward(model)
        self.balancer = RouterBiasBalancer(
            model.model,
            self._routers,
            gamma=self.args.router_bias_update_speed,
            schedule=self.args.router_bias_update_schedule,
            end=self.args.router_bias_update_end,
            reduce=lambda counts: self.accelerator.reduce(counts, reduction="sum"),
        )
        self.add_callback(self.balancer)
        if self.args.nonfinite_action != "none":
            self.add_callback(NonFiniteGuard(self.args.nonfinite_action))

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, dict[str, Any]]:
        """transformers' choice of optimizer, with `TritonAdamW` for torch's AdamW on CUDA (`triton_adamw`)."""
        from transformers import Trainer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        parameter = next(model.parameters(), None) if model is not None else None
        optim = getattr(args.optim, "value", args.optim)
        asked = getattr(args, "triton_adamw", False) and optimizer_cls is torch.optim.AdamW
        plain = parameter is not None and type(parameter.data) is torch.Tensor  # not FSDP2's DTensor: torch's fused
        if asked and plain and use_triton_adamw(optim, parameter.device):
            return TritonAdamW, kwargs
        return optimizer_cls, kwargs

    @property
    def deepseek_model(self) -> DeepSeekForCausalLM:
        """The `DeepSeekForCausalLM` inside any accelerate / PEFT wrapping."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        if not isinstance(model, DeepSeekForCausalLM):
            raise TypeError(f"{type(self).__name__} trains DeepSeekForCausalLM, got {type(model).__name__}")
        return model

    def _wrap_fused_forward(self, model: DeepSeekForCausalLM) -> None:
        """Compute the own losses inside the (possibly DDP/FSDP-wrapped) forward that TRL's loss calls."""
        fused_forward = model.forward  # TRL's patched forward, bound to this model

        @functools.wraps(fused_forward)
        def forward(*args, **kwargs):
            output = fused_forward(*args, **kwargs)
            if self._capturing and kwargs.get("fused_lm_head") and kwargs.get("labels") is not None:
                capture = self._captures[-1]
                capture.mtp_loss, capture.balance_loss = self._own_losses(capture, kwargs["labels"])
                # returned as output tensors, so DDP's unused-parameter search walks their graphs too
                output = DeepSeekFusedOutput(**output, mtp_loss=capture.mtp_loss, balance_loss=capture.balance_loss)
            return output

        model.forward = forward

    def _capture_backbone(self, module: nn.Module, args, kwargs, output) -> None:
        if self._capturing:
            aux = [r.last_aux_loss for r in self._routers if r.last_aux_loss is not None]
            self._captures.append(_Capture(dict(kwargs), output.last_hidden_state, aux))

    @contextlib.contextmanager
    def _deepseek_forward(self, training: bool) -> Iterator[list[_Capture]]:
        """Capture the backbone's outputs of the forwards run inside; count expert load only when training."""
        self._captures, self._capturing = [], True
        recording = self.balancer.recording() if training else contextlib.nullcontext()
        try:
            with recording:
                yield self._captures
        finally:
            self._capturing = False

    def current_mtp_loss_weight(self) -> float:
        """Lambda for the current step, following `mtp_loss_weight` -> `mtp_loss_weight_final`."""
        args = self.args
        weight = self.deepseek_model.config.mtp_loss_weight if args.mtp_loss_weight is None else args.mtp_loss_weight
        max_steps = self.state.max_steps or 0
        switched = max_steps > 0 and self.state.global_step >= args.mtp_loss_weight_switch * max_steps
        if args.mtp_loss_weight_final is not None and switched:
            weight = args.mtp_loss_weight_final
        return weight

    def _own_losses(self, capture: _Capture, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(MTP loss, balance loss) of one captured forward; None where the model has no such term."""
        model = self.deepseek_model
        mtp = None
        if model.config.num_nextn_predict_layers > 0:  # a batch without targets gives 0 (every rank joins backward)
            extra = {k: v for k, v in capture.kwargs.items() if k not in _MTP_NAMED + _NOT_FOR_MTP}
            named = [capture.kwargs.get(k) for k in _MTP_NAMED]
            mtp = model._mtp_loss(*named, capture.hidden_states, labels, **extra)
        aux = torch.stack(capture.aux_losses).sum() if capture.aux_losses else None
        return mtp, aux

    def _log_own_losses(self, mode: str, mtp: torch.Tensor | None, aux: torch.Tensor | None) -> None:
        for name, value in (("mtp_loss", mtp), ("aux_loss", aux)):
            if value is not None:
                gathered = self.accelerator.gather_for_metrics(value.detach().reshape(1)).mean().item()
                self._metrics[mode][name].append(gathered)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume through the model's own loader. Trainer reads a checkpoint's tensors into `load_state_dict`
        non-strictly, which silently skips the experts: `save_pretrained` writes them per expert (the official
        layout) while the module stacks them. A full model (not a PEFT adapter, not FSDP shards) is therefore
        re-read with `from_pretrained`, which applies the layout conversion, and copied in."""
        model = self.model if model is None else model
        plain = not hasattr(model, "get_base_model") and not self.is_fsdp_enabled
        if not plain or not os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end` through the same loader, for the same reason."""
        plain = not hasattr(self.model, "get_base_model") and not self.is_fsdp_enabled and not self.is_deepspeed_enabled
        if plain and os.path.isfile(os.path.join(self.state.best_model_checkpoint, "config.json")):
            return self._load_from_checkpoint(self.state.best_model_checkpoint)
        return super()._load_best_model()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs.update(self.balancer.pop_metrics())
        super().log(logs, start_time)
