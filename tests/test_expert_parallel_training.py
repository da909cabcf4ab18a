"""The expert-parallel training loop (`parallel/training.py`) over gloo, 2 CPU processes, on the r1_tiny recipe's
model (8 experts, an MTP layer) and data: four AdamW steps with the gradient clipped hard and fast router-bias moves
give the losses, gradient norms and final weights of one process on the whole batch; a run killed right after its
step-2 checkpoint and resumed from it gives the losses of steps 3 and 4 of the run that went on; the checkpoint is
the usual folder one process loads, and one process resumes it too. Bad process counts are one-line errors."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.cli import main
from hf_deepseek.parallel.training import build_trainer
from hf_deepseek.trainers.launch import torchrun_command
from hf_deepseek.trainers.recipes import apply_overrides, load_recipe

WORLD, PER_RANK, STEPS = 2, 2, 4


def _recipe(output_dir, **args):
    overrides = {
        "sft.data.tasks": "{addition: 40}", "max_steps": STEPS, "max_length": 48, "learning_rate": 0.01,
        "lr_scheduler_type": "cosine", "warmup_steps": 1, "max_grad_norm": 0.05, "router_bias_update_speed": 0.05,
        "per_device_train_batch_size": PER_RANK, "output_dir": str(output_dir), **args,
    }  # fmt: skip
    return apply_overrides(load_recipe("r1_tiny"), "sft", [f"{k}={v}" for k, v in overrides.items()])


def _rank(rank: int, port: int, out: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        args = {
            "full": {},
            "killed": {"save_strategy": "steps", "save_steps": 2},
            "resumed": {"resume_from_checkpoint": True},
        }[mode]
        run_dir = os.path.join(out, "full" if mode == "full" else "killed")
        trainer, rows = build_trainer(_recipe(run_dir, **args), "sft", mesh)
        if mode == "killed":
            save = trainer.save

            def save_then_die(path):
                save(path)
                os._exit(0)  # killed: no final save, no clean shutdown

            trainer.save = save_then_die
        history = trainer.train(rows, progress=lambda line: None)
        torch.save(history, os.path.join(out, f"{mode}{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(tmp_path, mode: str, offset: int) -> None:
    port = 29500 + os.getpid() % 300 + offset
    mp.start_processes(_rank, args=(port, str(tmp_path), mode), nprocs=WORLD, join=True, start_method="fork")


def test_expert_parallel_training_equals_one_process_and_resumes_after_a_kill(tmp_path):
    _spawn(tmp_path, "full", 0)
    _spawn(tmp_path, "killed", 1)
    assert not (tmp_path / "killed" / "model.safetensors").exists()  # killed before its final save
    assert not (tmp_path / "killed0.pt").exists()
    _spawn(tmp_path, "resumed", 2)
    full = torch.load(tmp_path / "full0.pt")
    assert [m["step"] for m in full] == [1, 2, 3, 4] and full[3]["loss"] < full[0]["loss"]
    assert torch.equal(torch.tensor(full[0]["loss"]), torch.tensor(torch.load(tmp_path / "full1.pt")[0]["loss"]))
    assert all(m["grad_norm"] > 0.05 for m in full)  # every step clipped: the global norm decides each update
    assert "mtp_loss" in full[0]

    # one process, the whole batch of 2 x 2 rows a step
    trainer, rows = build_trainer(_recipe(tmp_path / "alone", per_device_train_batch_size=WORLD * PER_RANK), "sft")
    alone = trainer.train(rows, progress=lambda line: None)
    for key in ("loss", "mtp_loss", "grad_norm", "max_violation"):
        torch.testing.assert_close(
            torch.tensor([m[key] for m in full]), torch.tensor([m[key] for m in alone]), rtol=1e-5, atol=1e-6
        )
    parallel = DeepSeekForCausalLM.from_pretrained(tmp_path / "full")  # one process loads the parallel run's output
    biases = [r.e_score_correction_bias for r in parallel.routers()]
    assert all(b.abs().max() > 0 for b in biases)  # the routers' biases moved
    for (name, got), want in zip(parallel.state_dict().items(), trainer.model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)

    # killed after the step-2 checkpoint, resumed from it: the losses of the run that went on (step 3 on the saved
    # weights and router biases, step 4 after an update with the restored AdamW moments and learning rate)
    state = json.loads((tmp_path / "killed" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    resumed = torch.load(tmp_path / "resumed0.pt")
    assert [m["step"] for m in resumed] == [3, 4]
    for key in ("loss", "grad_norm", "learning_rate"):
        torch.testing.assert_close(
            torch.tensor([m[key] for m in resumed]), torch.tensor([m[key] for m in full[2:]]), rtol=1e-6, atol=1e-7
        )
    # the same checkpoint resumed by one process (the same global batch: 4 rows on one process)
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    recipe = _recipe(tmp_path / "one", per_device_train_batch_size=WORLD * PER_RANK, resume_from_checkpoint=checkpoint)
    trainer, rows = build_trainer(recipe, "sft")
    alone_resumed = trainer.train(rows, progress=lambda line: None)
    losses = torch.tensor([m["loss"] for m in alone_resumed])
    torch.testing.assert_close(losses, torch.tensor([m["loss"] for m in full[2:]]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--num-processes", "1"],
            "hf-deepseek train: error: --expert-parallel needs at least 2 processes: add --num-processes N, or start "
            "it with `torchrun --nproc-per-node N -m hf_deepseek.cli train ... --expert-parallel`",
        ),
        (
            ["--num-processes", "3"],
            "hf-deepseek train: error: 8 routed experts cannot be split evenly over 3 processes: use a process count "
            "that divides 8 (2, 4, 8)",
        ),
        (
            [],
            "hf-deepseek train: error: --expert-parallel needs at least 2 processes: add --num-processes N, or start "
            "it with `torchrun --nproc-per-node N -m hf_deepseek.cli train ... --expert-parallel`",
        ),
    ],
)
def test_bad_expert_parallel_launches_are_one_line_errors(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "sft", "--recipe", "r1_tiny", "--expert-parallel", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_expert_parallel_refuses_grpo_and_all(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for stage, message in [
        ("grpo", "--expert-parallel trains SFT stages; 'grpo' is a GRPO stage"),
        ("all", "--expert-parallel trains one stage at a time: name the stage, e.g. `train sft`"),
    ]:
        with pytest.raises(SystemExit):
            main(["train", stage, "--recipe", "r1_tiny", "--num-processes", "2", "--expert-parallel"])
        assert capsys.readouterr().err == f"hf-deepseek train: error: {message}\n"


def test_num_processes_expert_parallel_trains_through_torchrun(tmp_path, capfd):
    """The user's command, end to end: torchrun starts two workers, which train and write the usual folder."""
    overrides = ["sft.data.tasks={addition: 24}", "max_steps=2", "max_length=48", "per_device_train_batch_size=1",
                 "logging_steps=1", f"output_dir={tmp_path}"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "sft", "--recipe", "r1_tiny", "--num-processes", "2", "--expert-parallel", *overrides])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 0, err[-3000:]
    assert f"launching: {' '.join(torchrun_command('sft', 'r1_tiny', overrides, 2))}" in out
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 -m hf_deepseek.cli train sft" in out
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)  # one process reads what two wrote
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8
    assert (tmp_path / "tokenizer.json").is_file()


def test_bench_train_num_processes_reports_tokens_per_gpu_and_scaling(tmp_path, capfd):
    main(["bench", "train", "--tiny", "--num-processes", "2", "--steps", "2", "--output-dir", str(tmp_path)])
    out = capfd.readouterr().out
    result = json.loads((tmp_path / "bench_train_parallel.json").read_text())
    one, two = result["runs"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert result["command"] == "hf-deepseek bench train --num-processes 2 --tiny --steps 2"
    tokens = result["plan"]["batch_size"] * result["plan"]["seq_len"]
    for run in (one, two):  # each process trains batch_size rows a step: the work grows with the process count
        assert run["tokens_per_s"] == pytest.approx(tokens * run["processes"] / (run["step_ms"] / 1000))
        assert run["tokens_per_s_per_gpu"] == pytest.approx(run["tokens_per_s"] / run["processes"])
        assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
    assert two["scaling"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert "| processes | ms/step | tokens/s | tokens/s per GPU | scaling vs 1 |" in out
    assert f"| 2 | {two['step_ms']:.1f} |" in out


@pytest.mark.parametrize(
    ("processes", "message"),
    [
        ("1", "--num-processes 1: the parallel bench compares N >= 2 processes with one"),
        ("3", "8 routed experts cannot be split evenly over 3 processes: use a process count that divides 8 (2, 4, 8)"),
    ],
)
def test_bench_train_refuses_bad_process_counts(processes, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--tiny", "--num-processes", processes])
    assert capsys.readouterr().err == f"hf-deepseek bench: error: {message}\n"
