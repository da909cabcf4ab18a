"""Interrupted and diverging training: a run killed with SIGKILL resumes on the same loss trajectory, and a NaN/inf
loss or gradient is skipped or stops the run (NonFiniteGuard) with the last good checkpoint kept.

The kill-and-resume test runs this file as a script in subprocesses (`python tests/test_reliability_training.py
MODE OUT_DIR`), so the kill is a real SIGKILL of a process in the middle of training.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from trainer_helpers import FAST_ARGS, addition_chats, router_biases, tiny_model  # noqa: E402

MAX_STEPS, SAVE_STEPS, KILL_AT = 28, 4, 6  # the killed run saved checkpoint-4; resumed, it runs 24 more steps


# ------------------------------------------------------------------------------ the training script


class LossRecorder(TrainerCallback):
    """Appends each logged step (loss, mtp_loss, learning rate) to a JSON-lines file, flushed to disk at once."""

    def __init__(self, path: str, kill_at: int | None = None):
        self.path, self.kill_at = path, kill_at

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            row = {"step": state.global_step, **{k: logs[k] for k in ("loss", "mtp_loss", "learning_rate")}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.kill_at is not None and state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: as the OOM killer or a preemption


def build_trainer(output_dir: str, callbacks=()):
    from hf_deepseek.data import build_tokenizer
    from hf_deepseek.trainers.sft import DeepSeekSFTConfig, DeepSeekSFTTrainer

    torch.set_num_threads(1)
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok, attention_dropout=0.1)  # dropout: the RNG state must be restored too
    args = DeepSeekSFTConfig(
        output_dir=output_dir,
        **{
            **FAST_ARGS,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 3,
            "max_steps": MAX_STEPS,
            "per_device_train_batch_size": 4,
            "save_strategy": "steps",
            "save_steps": SAVE_STEPS,
            "router_bias_update_speed": 0.01,
            "mtp_loss_weight_final": 0.1,
            "mtp_loss_weight_switch": 0.5,
        },
    )
    dataset = addition_chats(40)  # 10 batches an epoch: the run crosses epochs, resumes mid-epoch
    trainer = DeepSeekSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def main(mode: str, out: str) -> None:
    run_dir = os.path.join(out, "run")
    if mode == "full":
        build_trainer(run_dir, [LossRecorder(os.path.join(out, "losses.jsonl"))]).train()
    elif mode == "killed":
        build_trainer(run_dir, [LossRecorder(os.path.join(out, "losses.jsonl"), kill_at=KILL_AT)]).train()
    elif mode == "resume":
        torch.manual_seed(1234)  # nothing may come from this process's own state
        trainer = build_trainer(run_dir, [LossRecorder(os.path.join(out, "resumed.jsonl"))])
        trainer.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir
        biases = [b.tolist() for b in router_biases(trainer.deepseek_model)]
        with open(os.path.join(out, "biases.json"), "w") as f:
            json.dump(biases, f)


# ------------------------------------------------------------------------------ kill and resume


def run_script(mode: str, out) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    return subprocess.run(
        [sys.executable, __file__, mode, str(out)], env=env, capture_output=True, text=True, timeout=300
    )


def read_losses(path) -> dict[int, dict]:
    with open(path) as f:
        return {row["step"]: row for row in map(json.loads, f)}


def test_sigkilled_run_resumes_on_the_same_loss_trajectory(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    procs = {
        mode: subprocess.Popen(
            [sys.executable, __file__, mode, str(out)],
            env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for mode, out in (("full", full), ("killed", killed))
    }
    outputs = {mode: proc.communicate(timeout=300)[0] for mode, proc in procs.items()}
    assert procs["full"].returncode == 0, outputs["full"][-3000:]
    assert procs["killed"].returncode == -signal.SIGKILL, outputs["killed"][-3000:]

    checkpoints = sorted(d for d in os.listdir(killed / "run") if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-4"]  # killed at step 6: the step-4 checkpoint is the last one
    before_kill = read_losses(killed / "losses.jsonl")
    assert sorted(before_kill) == list(range(1, KILL_AT + 1))

    resumed = run_script("resume", killed)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    reference = read_losses(full / "losses.jsonl")
    after = read_losses(killed / "resumed.jsonl")
    steps = sorted(after)
    assert steps == list(range(SAVE_STEPS + 1, MAX_STEPS + 1)) and len(steps) >= 20
    for key in ("loss", "mtp_loss", "learning_rate"):
        got = torch.tensor([after[s][key] for s in steps], dtype=torch.float64)
        want = torch.tensor([reference[s][key] for s in steps], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{key} after resume")
    # the killed run itself followed the same trajectory until it died
    for s in before_kill:
        assert before_kill[s]["loss"] == pytest.approx(reference[s]["loss"], rel=1e-5)
    # the loss moved (the comparison is not between two flat lines) and the biases end where the full run's do
    assert reference[SAVE_STEPS + 1]["loss"] - reference[MAX_STEPS]["loss"] > 0.1
    from hf_deepseek import DeepSeekForCausalLM

    final = DeepSeekForCausalLM.from_pretrained(full / "run" / f"checkpoint-{MAX_STEPS}")
    with open(killed / "biases.json") as f:
        resumed_biases = [torch.tensor(b) for b in json.load(f)]
    for got, want in zip(resumed_biases, router_biases(final), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert want.abs().max() > 0


# ------------------------------------------------------------------------------ non-finite loss and gradients


class Poison(TrainerCallback):
    """At the given global steps, make the backbone output NaN (a non-finite loss) or one gradient inf."""

    def __init__(self, model, steps: set[int], kind: str):
        self.steps, self.kind, self.active = steps, kind, False
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        model.model.norm.register_forward_hook(lambda m, a, out: out * float("nan") if self.nan_loss else out)
        model.lm_head.weight.register_hook(lambda g: g * float("inf") if self.active and kind == "grad" else g)

    @property
    def nan_loss(self) -> bool:
        return self.active and self.kind == "loss"

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.active = state.global_step + 1 in self.steps
        if self.active:
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.active:
            self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.active = False


def guarded_trainer(tmp_path, action: str, kind: str, steps: set[int], max_steps: int = 6):
    from hf_deepseek.data import build_tokenizer
    from hf_deepseek.trainers.nonfinite import NonFiniteGuard
    from hf_deepseek.trainers.sft import DeepSeekSFTConfig, DeepSeekSFTTrainer

    tok = build_tokenizer()
    model = tiny_model(tok)
    args = dict(learning_rate=1e-3, max_steps=max_steps, per_device_train_batch_size=4)
    args.update(save_strategy="steps", save_steps=2)
    config = DeepSeekSFTConfig(output_dir=str(tmp_path / "run"), nonfinite_action=action, **{**FAST_ARGS, **args})
    trainer = DeepSeekSFTTrainer(model=model, args=config, train_dataset=addition_chats(32), processing_class=tok)
    (guard,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, NonFiniteGuard)]  # from the config
    poison = Poison(model, steps, kind)
    trainer.add_callback(poison)
    return trainer, guard, poison


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_leaves_the_weights_unchanged(tmp_path, kind, caplog):
    trainer, guard, poison = guarded_trainer(tmp_path, "skip", kind, steps={3})
    with caplog.at_level("WARNING", logger="hf_deepseek.trainers.nonfinite"):
        trainer.train()
    assert guard.skipped_steps == [3]
    assert "step 3: non-finite loss or gradient" in caplog.text and "the update was skipped" in caplog.text
    for name, value in poison.before.items():  # the skipped step changed no weight
        assert torch.equal(poison.after[name], value), name
    assert trainer.state.global_step == 6
    model = trainer.deepseek_model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in router_biases(model))


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, kind):
    from hf_deepseek import DeepSeekForCausalLM
    from hf_deepseek.trainers.nonfinite import NonFiniteTrainingError

    trainer, _, _ = guarded_trainer(tmp_path, "stop", kind, steps={3})
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    message = str(err.value)
    assert message.startswith("step 3: non-finite loss or gradient (first in ")
    assert f"training stopped before the update, the last good checkpoint is {checkpoint}" in message
    assert "resume_from_checkpoint" in message
    assert sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint-")) == ["checkpoint-2"]
    loaded = DeepSeekForCausalLM.from_pretrained(checkpoint)  # finite: the loader's scan would refuse NaN
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_skipping_gives_up_after_too_many_bad_steps_in_a_row(tmp_path):
    from hf_deepseek.trainers.nonfinite import NonFiniteGuard, NonFiniteTrainingError

    trainer, guard, _ = guarded_trainer(tmp_path, "skip", "loss", steps=set(range(2, 20)), max_steps=20)
    guard.max_consecutive_skips = 3
    with pytest.raises(NonFiniteTrainingError, match="step 5: .* after 3 skipped steps in a row"):
        trainer.train()
    assert guard.skipped_steps == [2, 3, 4]
    with pytest.raises(ValueError, match="action='ignore' is invalid"):
        NonFiniteGuard("ignore")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
