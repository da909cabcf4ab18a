"""NonFiniteGuard: a Trainer callback that catches a NaN or inf loss or gradient before the optimizer applies it.

It runs after backward and clipping, before `optimizer.step()`. A non-finite loss shows there too: its gradients
are NaN. With `action="stop"` the run ends with `NonFiniteTrainingError` naming the step, the first bad parameter
and the last checkpoint written (which the error leaves untouched); with `action="skip"` the step's gradients are
dropped (the optimizer leaves every weight and its moments as they were) and training goes on, until
`max_consecutive_skips` steps in a row were bad.
"""

import logging
import os

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
ACTIONS = ("stop", "skip")


class NonFiniteTrainingError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step, parameter and checkpoint."""


class NonFiniteGuard(TrainerCallback):
    """`trainer.add_callback(NonFiniteGuard("skip"))`; `skipped_steps` lists the global steps whose update was
    dropped."""

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 10):
        if action not in ACTIONS:
            raise ValueError(f"NonFiniteGuard action={action!r} is invalid: must be one of {ACTIONS}")
        if max_consecutive_skips < 1:
            raise ValueError(f"NonFiniteGuard max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps: list[int] = []
        self._consecutive = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        if not named:
            return
        norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for _, g in named])
        if bool(torch.isfinite(norms).all()):
            self._consecutive = 0
            return
        step = state.global_step + 1
        bad = next(n for (n, _), norm in zip(named, norms, strict=True) if not torch.isfinite(norm))
        where = f"step {step}: non-finite loss or gradient (first in {bad})"
        self._consecutive += 1
        if self.action == "stop" or self._consecutive > self.max_consecutive_skips:
            checkpoint = _last_checkpoint(args.output_dir)
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
            reason = "" if self.action == "stop" else f" after {self.max_consecutive_skips} skipped steps in a row"
            raise NonFiniteTrainingError(
                f"{where}; training stopped{reason} before the update, {kept}. Lower the learning rate or check "
                "the data, then resume with trainer.train(resume_from_checkpoint=...)."
            )
        for param in model.parameters():
            param.grad = None
        self.skipped_steps.append(step)
        logger.warning("%s; the update was skipped (%d skipped so far)", where, len(self.skipped_steps))


def _last_checkpoint(output_dir: str | None) -> str | None:
    if not output_dir or not os.path.isdir(output_dir):
        return None
    steps = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    if not steps:
        return None
    return os.path.join(output_dir, max(steps, key=lambda d: int(d.split("-")[-1])))


__all__ = ["NonFiniteGuard", "NonFiniteTrainingError"]
