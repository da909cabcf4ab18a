"""DeepSeekSFTTrainer: TRL's SFTTrainer that also trains the MTP and balance losses and balances the experts.

The main loss, its token accuracy and entropy are TRL's own (fused LM head); the MTP loss and the routers'
sequence-wise balance loss are computed by the model from the captured backbone output and added with the same
gradient-accumulation share as the main loss. Packing (padding-free batches) keeps documents apart in attention
(the model builds a block-diagonal mask from `position_ids`) and in the MTP targets (`mtp_labels`).
"""

from dataclasses import dataclass

import torch
from trl import SFTConfig, SFTTrainer

from hf_deepseek.trainers.deepseek_losses import DeepSeekLossesMixin, DeepSeekTrainingFields


@dataclass
class DeepSeekSFTConfig(DeepSeekTrainingFields, SFTConfig):
    """`trl.SFTConfig` plus the MTP weight schedule and the router-bias update speed (see DeepSeekTrainingFields)."""


class DeepSeekSFTTrainer(DeepSeekLossesMixin, SFTTrainer):
    """`trl.SFTTrainer` for `DeepSeekForCausalLM` (plain or with a PEFT adapter); logs `mtp_loss`, `aux_loss` and
    `balance/*`."""

    _tag_names = ["trl", "sft", "hf-deepseek"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_deepseek()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        with self._deepseek_forward(training=mode == "train") as captures:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        capture = captures[0]  # the fused forward's backbone pass (a `return_outputs` recompute may follow)
        mtp, aux = capture.mtp_loss, capture.balance_loss
        extra = torch.zeros((), device=loss.device)
        if mtp is not None:
            extra = extra + self.current_mtp_loss_weight() * mtp
        if aux is not None:
            extra = extra + aux
        loss = loss + self._accumulation_share(inputs["labels"], num_items_in_batch) * extra
        self._log_own_losses(mode, mtp, aux)
        return (loss, outputs) if return_outputs else loss

    def _accumulation_share(self, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
        """The weight of this micro-batch's means in the accumulated step, as TRL weighs its main loss: the share of
        the step's label tokens (times the processes when tokens are averaged across devices), or 1 when the
        Trainer itself divides by the accumulation steps."""
        if num_items_in_batch is None:
            return 1.0
        share = (labels[:, 1:] != -100).sum() / torch.as_tensor(num_items_in_batch, device=labels.device).clamp(min=1)
        if self.args.average_tokens_across_devices:
            share = share * (self.accelerator.num_processes // self.get_tp_size())
        return share
