"""One GRPO run of the issue-7 sweep (benchmarks/grpo_sweep.sh), stopped by the wall clock:
`hf-deepseek train grpo --recipe r1_tiny KEY=VALUE...` (the same recipe loading, overrides and `run_stage`) plus a
callback that

- stops training cleanly (final model + tokenizer saved to output_dir by run_stage) once the next step would end
  after WALL seconds since this process started,
- saves intermediate checkpoints (`checkpoint-N`, loadable by from_pretrained) at the fractions SAVE_FRACS of WALL,
- writes `<output_dir>/steps.json`: each step's end time, and at a few steps the gradient and Adam statistics over
  the weights that had any gradient so far (percentiles of |g| after clipping and of sqrt(v_hat), the share whose
  sqrt(v_hat) is below 1e-6/1e-5/1e-4: the weights a larger adam_epsilon slows down), and the share that never had
  one (the MTP layer when mtp_loss_weight is 0, unused token rows, ...).

    python benchmarks/grpo_wall.py KEY=VALUE ...   (env WALL seconds, default 330; SAVE_FRACS, default "0.4,0.7")

Started by benchmarks/grpo_sweep.sh, one process per configuration. The KEY=VALUE overrides are those of
`hf-deepseek train grpo` (e.g. `positive_advantages_only=true`, a DeepSeekGRPOConfig field); `output_dir` is required.
steps.json also records the generation path taken ("fast", "trl-default" or the fallback) and the advantages'
sign ("positive" with positive_advantages_only, else "both").
"""

import copy
import json
import os
import sys
import time

T0 = time.time()

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hf_deepseek  # noqa: E402,F401  (registers the Auto classes)
from hf_deepseek.trainers.recipes import apply_overrides, load_recipe, run_stage  # noqa: E402

WALL = float(os.environ.get("WALL", "330"))
SAVE_FRACS = [float(f) for f in os.environ.get("SAVE_FRACS", "0.4,0.7").split(",") if f]
STAT_STEPS = {1, 5, 10, 25, 50, 100, 200, 400}


def percentiles(x: torch.Tensor, qs=(0.1, 0.5, 0.9, 0.99)) -> list[float]:
    x = x.float().flatten()
    if x.numel() > 2_000_000:
        x = x[torch.randperm(x.numel(), device=x.device)[:2_000_000]]
    return [float(v) for v in torch.quantile(x, torch.tensor(qs, device=x.device))]


class WallClock(TrainerCallback):
    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "steps.json")
        self.record = {"wall": WALL, "t_train_begin": None, "steps": [], "stats": {}}
        self.saves = sorted(SAVE_FRACS)
        self.last = None

    def _write(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.record, f)
        os.replace(self.path + ".tmp", self.path)

    def on_train_begin(self, args, state, control, **kw):
        self.last = time.time()
        self.record["t_train_begin"] = self.last - T0
        print(f"[{self.last - T0:6.1f}s] train begins", flush=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        step = state.global_step + 1
        if step in STAT_STEPS and model is not None:
            grads = [p.grad.detach().abs().flatten() for p in model.parameters() if p.grad is not None]
            grads = torch.cat(grads) if grads else None
            if grads is not None and (grads > 0).any():
                self.record["stats"].setdefault(str(step), {})["abs_grad_p10_50_90_99"] = percentiles(grads[grads > 0])

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        step = state.global_step + 1
        if step not in STAT_STEPS or optimizer is None:
            return
        roots = []
        for group in optimizer.param_groups:
            beta2 = group.get("betas", (0.9, 0.999))[1]
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if "exp_avg_sq" in st:
                    t = float(st.get("step", step))
                    roots.append((st["exp_avg_sq"] / (1 - beta2**t)).sqrt().flatten())
        if roots:
            r = torch.cat(roots)
            touched = r[r > 0]  # weights that had a gradient so far (not the MTP layer at mtp_loss_weight 0, ...)
            self.record["stats"].setdefault(str(step), {}).update(
                share_never_touched=float(1 - touched.numel() / r.numel()),
                sqrt_vhat_p10_50_90_99=percentiles(touched) if touched.numel() else [],
                share_sqrt_vhat_below={
                    str(e): float((touched < e).float().mean()) if touched.numel() else 0.0 for e in (1e-6, 1e-5, 1e-4)
                },
            )

    def on_step_end(self, args, state, control, **kw):
        now = time.time()
        dt, self.last = now - self.last, now
        elapsed = now - T0
        self.record["steps"].append([state.global_step, round(elapsed, 3)])
        typical = sorted(s for s in self._durations()[-5:]) or [dt]
        if elapsed + 1.2 * typical[len(typical) // 2] + 3 > WALL:  # +3 s: the final save
            control.should_training_stop = True
            self.record["stopped_by_wall"] = True
            print(f"[{elapsed:6.1f}s] wall budget reached at step {state.global_step}", flush=True)
        elif self.saves and elapsed > self.saves[0] * WALL:
            while self.saves and elapsed > self.saves[0] * WALL:
                self.saves.pop(0)
            control.should_save = True
        if state.global_step <= 3 or state.global_step % 10 == 0 or control.should_training_stop:
            print(f"[{elapsed:6.1f}s] step {state.global_step} ({dt:.2f} s)", flush=True)
        self._write()

    def _durations(self):
        s = self.record["steps"]
        return [b[1] - a[1] for a, b in zip(s, s[1:], strict=False)]

    def on_train_end(self, args, state, control, **kw):
        self.record["t_train_end"] = time.time() - T0
        self._write()


def guard_fast_generation(clock: WallClock) -> None:
    """If the fast rollout path (static latent cache + compiled CUDA-graph step, `grpo.fast_generation_config`)
    raises inside TRL's generation, note it and go on with TRL's own config (dynamic cache, no compilation)."""
    from hf_deepseek.trainers.grpo import DeepSeekGRPOTrainer

    original = DeepSeekGRPOTrainer._generate_single_turn

    def generate(self, *args, **kwargs):
        config = self.generation_config
        clock.record.setdefault("generation", "fast" if config.disable_compile is False else "trl-default")
        try:
            return original(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if config.disable_compile is not False:
                raise
            message = f"fast generation failed ({type(error).__name__}: {str(error)[:300]}); TRL's default from now on"
            print(f"[{time.time() - T0:6.1f}s] {message}", flush=True)
            clock.record["generation"] = "fallback: " + message
            fallback = copy.deepcopy(config)
            fallback.cache_implementation, fallback.disable_compile = self.args.cache_implementation, True
            self.generation_config = fallback
            return original(self, *args, **kwargs)

    DeepSeekGRPOTrainer._generate_single_turn = generate


def main(overrides: list[str]) -> None:
    recipe = apply_overrides(load_recipe("r1_tiny"), "grpo", overrides)
    args = recipe["grpo"]["args"]
    out = args["output_dir"]
    clock = WallClock(out)
    guard_fast_generation(clock)
    clock.record["advantages"] = "positive" if args.get("positive_advantages_only") else "both"
    trainer = run_stage("grpo", recipe, callbacks=[clock])
    clock.record["global_step"] = trainer.state.global_step
    clock.record["t_saved"] = time.time() - T0
    clock._write()
    print(f"[{time.time() - T0:6.1f}s] saved {out} after {trainer.state.global_step} steps", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
