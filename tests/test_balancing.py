"""Tests for aux-loss-free balancing (hf_deepseek.trainers.balancing) on its own and inside DeepSeekSFTTrainer:
metrics, the gamma schedule, padding and gradient-checkpointing safe counting, an imbalanced router evened out,
gradient accumulation equal to one big batch, counts summed over ranks, and biases kept across save/resume."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from trainer_helpers import FAST_ARGS, addition_chats, make_imbalanced, router_biases, tiny_model

from hf_deepseek.data import build_tokenizer
from hf_deepseek.trainers.balancing import (
    ExpertLoadTracker,
    RouterBiasBalancer,
    balance_metrics,
    bias_update_speed,
    load_entropy,
    max_violation,
    update_router_biases,
)
from hf_deepseek.trainers.sft import DeepSeekSFTConfig, DeepSeekSFTTrainer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def chat_batch(tok, dataset, n: int) -> dict[str, torch.Tensor]:
    messages = [row["messages"] for row in dataset.select(range(n))]
    return tok.apply_chat_template(messages, return_tensors="pt", padding=True, return_dict=True)


def measured_violation(model, tok, dataset, n: int = 128) -> float:
    """Mean over layers of the max violation on a fixed batch of real tokens (a low-noise measurement)."""
    tracker = ExpertLoadTracker(model.model, model.routers())
    batch = chat_batch(tok, dataset, n)
    with torch.no_grad(), tracker.recording():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tracker.remove()
    return max_violation(tracker.pop()).mean().item()


def sft_trainer(model, tok, dataset, output_dir, **args) -> DeepSeekSFTTrainer:
    config = DeepSeekSFTConfig(output_dir=str(output_dir), **{**FAST_ARGS, "learning_rate": 1e-4, **args})
    return DeepSeekSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)


# ------------------------------------------------------------------------------ metrics, gamma


def test_metrics_of_even_and_skewed_loads():
    even, skewed = torch.tensor([[5, 5, 5, 5]]), torch.tensor([[20, 0, 0, 0]])
    assert max_violation(even).item() == 0 and max_violation(skewed).item() == pytest.approx(3.0)
    assert load_entropy(even).item() == pytest.approx(1.0) and load_entropy(skewed).item() == pytest.approx(0.0)
    metrics = balance_metrics(torch.cat([even, skewed]))
    assert metrics["balance/max_violation"] == pytest.approx(1.5)
    assert metrics["balance/layer_1/max_violation"] == pytest.approx(3.0)
    assert metrics["balance/load_entropy"] == pytest.approx(0.5)
    assert set(metrics) == {
        f"balance/{scope}{name}" for scope in ("", "layer_0/", "layer_1/") for name in ("max_violation", "load_entropy")
    }


def test_gamma_schedule():
    assert bias_update_speed(1e-3, 0, 100) == 1e-3
    assert bias_update_speed(1e-3, 96, 100, "constant", end=0.95) == 0.0
    assert bias_update_speed(1e-3, 50, 100, "linear") == pytest.approx(5e-4)
    assert bias_update_speed(1e-3, 100, 100, "linear") == 0.0
    with pytest.raises(ValueError, match="schedule"):
        bias_update_speed(1e-3, 0, 1, "cosine")


def test_bias_moves_against_the_load(tok):
    model = tiny_model(tok)
    load = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5]] * len(model.routers()))
    update_router_biases(model.routers(), load, gamma=0.01)
    for bias in router_biases(model):
        assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------ counting


def test_tracker_counts_real_tokens_only_while_recording(tok):
    model = tiny_model(tok)
    tracker = ExpertLoadTracker(model.model, model.routers())
    batch = chat_batch(tok, addition_chats(6), 6)
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert tracker.pop() is None  # nothing counted outside recording()
    with tracker.recording():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    counts = tracker.pop()
    real_tokens = int(batch["attention_mask"].sum())
    assert counts.shape == (len(model.routers()), 8)
    assert counts.sum(dim=1).tolist() == [real_tokens * model.config.num_experts_per_tok] * len(model.routers())


def test_gradient_checkpointing_recomputation_is_not_counted(tok, tmp_path):
    dataset = addition_chats(16)
    model = tiny_model(tok)
    trainer = sft_trainer(
        model, tok, dataset, tmp_path, max_steps=1, per_device_train_batch_size=4, gradient_checkpointing=True
    )
    trainer.train()
    assert model.is_gradient_checkpointing
    lengths = sorted(len(ids) for ids in trainer.train_dataset["input_ids"])
    load = trainer.balancer.last_load
    tokens_per_layer = load.sum(dim=1) // model.config.num_experts_per_tok
    # one step of 4 sequences: the tokens of those 4 sequences once, not twice
    assert (tokens_per_layer == tokens_per_layer[0]).all()
    assert 4 * lengths[0] <= tokens_per_layer[0] <= 4 * lengths[-1]


# ------------------------------------------------------------------------------ balancing in training


@pytest.mark.parametrize("gamma", [0.02, 0.0])
def test_imbalanced_router_is_evened_out_only_with_gamma(tok, tmp_path, gamma):
    dataset = addition_chats(512)
    model = tiny_model(tok, num_hidden_layers=2)
    make_imbalanced(model, tok, dataset)
    before = measured_violation(model, tok, dataset)
    assert before > 2.5  # top-2 of 8 experts: 3 is all tokens on two experts
    trainer = sft_trainer(
        model, tok, dataset, tmp_path, max_steps=40, per_device_train_batch_size=8, router_bias_update_speed=gamma
    )
    trainer.train()
    after = measured_violation(model, tok, dataset)
    logged = [row["balance/max_violation"] for row in trainer.state.log_history if "balance/max_violation" in row]
    assert len(logged) == 40 and all(math.isfinite(v) for v in logged)
    if gamma > 0:
        assert after <= before / 2, (before, after)
        assert sum(logged[-10:]) / 10 <= logged[0] / 2
    else:
        assert after > before * 0.9, (before, after)
        assert all(bias.abs().max() == 0 for bias in router_biases(model))


def test_gradient_accumulation_updates_the_bias_as_one_big_batch(tok, tmp_path):
    dataset = addition_chats(64)
    runs = {}
    for micro_batch, steps in ((2, 4), (8, 1)):
        torch.manual_seed(0)
        model = tiny_model(tok)
        trainer = sft_trainer(
            model,
            tok,
            dataset,
            tmp_path / f"bs{micro_batch}",
            max_steps=1,
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=steps,
            router_bias_update_speed=0.01,
        )
        trainer.train()
        runs[micro_batch] = (trainer.balancer.last_load, router_biases(model))
    (load_small, bias_small), (load_big, bias_big) = runs[2], runs[8]
    assert torch.equal(load_small, load_big)
    assert all(torch.equal(a, b) for a, b in zip(bias_small, bias_big, strict=True))
    assert any(b.abs().max() > 0 for b in bias_big)


def test_biases_survive_save_and_resume(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    dataset = addition_chats(64)
    torch.manual_seed(0)
    model = tiny_model(tok)
    args = dict(per_device_train_batch_size=4, router_bias_update_speed=0.01, save_strategy="steps", save_steps=2)
    sft_trainer(model, tok, dataset, tmp_path / "run", max_steps=4, **args).train()
    uninterrupted = router_biases(model)
    saved = router_biases(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-4"))
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, saved, strict=True))
    at_step_2 = router_biases(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-2"))
    assert not all(torch.equal(a, b) for a, b in zip(at_step_2, uninterrupted, strict=True))

    torch.manual_seed(1)  # another initialisation: all the state must come from the checkpoint
    resumed_model = tiny_model(tok)
    trainer = sft_trainer(resumed_model, tok, dataset, tmp_path / "resumed", max_steps=4, **args)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert all(torch.equal(a, b) for a, b in zip(router_biases(resumed_model), uninterrupted, strict=True))
    # the experts too (Trainer's own resume would skip them: they are saved per expert, stacked in the module)
    expected = model.state_dict()
    for name, tensor in resumed_model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)


# ------------------------------------------------------------------------------ data parallel


def _rank_step(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = tiny_model(build_tokenizer())
        balancer = RouterBiasBalancer(model.model, model.routers(), gamma=0.01)
        # each rank saw a different micro-batch: rank 0 loads expert 0 with 10 tokens, rank 1 expert 1 with 20
        balancer.tracker.counts = torch.zeros(len(model.routers()), 8, dtype=torch.long)
        balancer.tracker.counts[:, rank] = 10 * (rank + 1)
        balancer.step(global_step=0, max_steps=10)
        torch.save((balancer.last_load, router_biases(model)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_counts_are_summed_over_data_parallel_ranks(tmp_path):
    port = 29500 + os.getpid() % 1000
    # fork: the children inherit the imported modules, so the test takes a second, not the imports' half minute
    mp.start_processes(_rank_step, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    (load0, bias0), (load1, bias1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(load0, load1) and load0[0, :2].tolist() == [10, 20]
    assert all(torch.equal(a, b) for a, b in zip(bias0, bias1, strict=True))  # every rank moves its biases alike
    assert bias0[0][:3].tolist() == pytest.approx([-0.01, -0.01, 0.01])  # both loaded experts are above the mean
