"""One stage of a recipe on a wall-clock budget, for GPU runs of fixed length (benchmarks/r1_add_sub_gpu.sh):

    WALL=200 python benchmarks/train_wall.py RECIPE STAGE [KEY=VALUE ...]

The same recipe loading, overrides and `run_stage` as `hf-deepseek train STAGE --recipe RECIPE`, plus a callback that
stops training cleanly (final model saved by run_stage) once the next step would end after WALL seconds since this
process started. With TIME_COSINE=1 the learning rate follows a cosine over the wall budget instead of over
max_steps (linear warm-up over the recipe's `warmup_steps`), so a run stopped by the clock is fully annealed; set
max_steps above what the budget allows. Prints the steps reached and writes `<output_dir>/wall.json`.
"""

import json
import math
import os
import statistics
import sys
import time

T0 = time.time()

from transformers import TrainerCallback  # noqa: E402

import hf_deepseek  # noqa: E402,F401  (registers the Auto classes)
from hf_deepseek.trainers.recipes import apply_overrides, load_recipe, run_stage  # noqa: E402

WALL = float(os.environ.get("WALL", "300"))
TIME_COSINE = os.environ.get("TIME_COSINE", "0") == "1"


class WallClock(TrainerCallback):
    def __init__(self):
        self.begin = None
        self.last = None
        self.durations: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = self.last = time.time()
        print(f"[{self.begin - T0:6.1f}s] train begins", flush=True)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not TIME_COSINE or optimizer is None:
            return
        step = state.global_step + 1
        if step <= args.warmup_steps:
            scale = step / max(1, args.warmup_steps)
        else:
            done = (time.time() - self.begin) / max(1.0, WALL - (self.begin - T0))
            scale = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * scale

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        self.durations.append(now - self.last)
        self.last = now
        typical = sorted(self.durations[-5:])[len(self.durations[-5:]) // 2]
        if now - T0 + 1.2 * typical + 3 > WALL:
            control.should_training_stop = True
        if state.global_step % 50 == 0 or control.should_training_stop:
            print(f"[{now - T0:6.1f}s] step {state.global_step} ({typical:.3f} s/step)", flush=True)


if __name__ == "__main__":
    recipe_name, stage, *overrides = sys.argv[1:]
    recipe = apply_overrides(load_recipe(recipe_name), stage, overrides)
    clock = WallClock()
    if recipe[stage].get("trainer", stage) == "grpo":  # fall back to TRL's rollouts if the fast path fails
        from grpo_wall import guard_fast_generation

        clock.record = {}
        guard_fast_generation(clock)
    trainer = run_stage(stage, recipe, callbacks=[clock])
    record = {
        **getattr(clock, "record", {}),
        "wall": WALL,
        "steps": trainer.state.global_step,
        "seconds": time.time() - T0,
        "median_step_s": statistics.median(clock.durations) if clock.durations else None,
    }
    with open(os.path.join(trainer.args.output_dir, "wall.json"), "w") as out:
        json.dump(record, out)
    print(f"{stage} done: {record}", flush=True)
