"""Tests for hf_deepseek.trainers: DeepSeekSFTTrainer trains the MTP (plain TRL does not), the balance loss and
the MTP weight schedule; PEFT LoRA and packed padding-free batches; DeepSeekGRPOTrainer with beta = 0 and > 0
logs finite reward and completion metrics; the `hf-deepseek train` recipes write checkpoints that reload through
AutoModelForCausalLM, and PNG plots."""

import json
import math
import re

import pytest
import torch
from trainer_helpers import FAST_ARGS, addition_chats, grpo_problems, router_biases, tiny_model
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_deepseek.cli import main as cli_main
from hf_deepseek.data import build_tokenizer
from hf_deepseek.trainers.grpo import DeepSeekGRPOConfig, DeepSeekGRPOTrainer, freeze_except
from hf_deepseek.trainers.rewards import get_reward_funcs
from hf_deepseek.trainers.sft import DeepSeekSFTConfig, DeepSeekSFTTrainer

TINY_MODEL_OVERRIDE = (
    "model.config={hidden_size: 64, intermediate_size: 128, moe_intermediate_size: 32, num_hidden_layers: 2, "
    "num_attention_heads: 4, first_k_dense_replace: 1, n_routed_experts: 8, num_experts_per_tok: 2, n_group: 2, "
    "topk_group: 1, q_lora_rank: 32, kv_lora_rank: 32, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16, "
    "max_position_embeddings: 512}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class GradientProbe(TrainerCallback):
    """Records, before each optimizer step, the gradient norm of every parameter."""

    def __init__(self, model):
        self.model, self.norms = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append(
            {n: (0.0 if p.grad is None else p.grad.norm().item()) for n, p in self.model.named_parameters()}
        )


def mtp_parameter_names(model) -> list[str]:
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


def logged(trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


# ------------------------------------------------------------------------------------------------ SFT


def run_sft(trainer_cls, config_cls, tok, tmp_path, steps=12, **args):
    torch.manual_seed(0)
    model = tiny_model(tok)
    probe = GradientProbe(model)
    config = config_cls(
        output_dir=str(tmp_path),
        **{**FAST_ARGS, "max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 3e-3, **args},
    )
    trainer = trainer_cls(
        model=model, args=config, train_dataset=addition_chats(256), processing_class=tok, callbacks=[probe]
    )
    trainer.train()
    return model, trainer, probe


def test_sft_trains_every_mtp_parameter_and_logs_a_falling_mtp_loss(tok, tmp_path):
    model, trainer, probe = run_sft(DeepSeekSFTTrainer, DeepSeekSFTConfig, tok, tmp_path, assistant_only_loss=True)
    names = mtp_parameter_names(model)
    assert len(names) > 10
    first_step = probe.norms[0]
    assert all(first_step[n] > 0 for n in names), [n for n in names if first_step[n] == 0]
    mtp = logged(trainer, "mtp_loss")
    assert len(mtp) == 12 and all(math.isfinite(x) for x in mtp)
    assert sum(mtp[-3:]) / 3 < sum(mtp[:3]) / 3 - 0.2, mtp
    assert all(math.isfinite(x) for x in logged(trainer, "balance/max_violation"))


def test_plain_trl_sft_leaves_the_mtp_untrained(tok, tmp_path):
    """The gap DeepSeekSFTTrainer closes: TRL's fused LM head runs the backbone only."""
    model, trainer, probe = run_sft(SFTTrainer, SFTConfig, tok, tmp_path, steps=2, assistant_only_loss=True)
    assert all(probe.norms[0][n] == 0 for n in mtp_parameter_names(model))
    assert not logged(trainer, "mtp_loss")
    assert all(bias.abs().max() == 0 for bias in router_biases(model))  # and nothing balances the experts


def test_sft_trains_the_sequence_balance_loss(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tok, aux_loss_alpha=0.01)
    config = DeepSeekSFTConfig(
        output_dir=str(tmp_path), **{**FAST_ARGS, "max_steps": 2, "per_device_train_batch_size": 4}
    )
    trainer = DeepSeekSFTTrainer(model=model, args=config, train_dataset=addition_chats(16), processing_class=tok)
    trainer.train()
    aux = logged(trainer, "aux_loss")
    # alpha * sum_i f_i P_i is about alpha * 1 for an even router, per MoE layer
    assert len(aux) == 2 and all(0 < x < 0.1 for x in aux)


def test_mtp_loss_weight_schedule(tok, tmp_path):
    model = tiny_model(tok)
    config = DeepSeekSFTConfig(
        output_dir=str(tmp_path), **FAST_ARGS, mtp_loss_weight_final=0.1, mtp_loss_weight_switch=0.5
    )
    trainer = DeepSeekSFTTrainer(model=model, args=config, train_dataset=addition_chats(8), processing_class=tok)
    trainer.state.max_steps = 10
    assert trainer.current_mtp_loss_weight() == model.config.mtp_loss_weight == 0.3
    trainer.state.global_step = 5
    assert trainer.current_mtp_loss_weight() == 0.1


def test_sft_with_lora_and_packed_padding_free_batches(tok, tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = tiny_model(tok)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "kv_a_proj_with_mqa", "o_proj"])
    config = DeepSeekSFTConfig(
        output_dir=str(tmp_path),
        **{**FAST_ARGS, "max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2},
        packing=True,
        max_length=64,
        router_bias_update_speed=0.01,
    )
    trainer = DeepSeekSFTTrainer(
        model=model, args=config, train_dataset=addition_chats(64), processing_class=tok, peft_config=lora
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["position_ids"].shape[0] == 1  # padding-free
    assert (batch["position_ids"][0, 1:] == 0).sum() >= 2  # several documents in the row
    trainer.train()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(math.isfinite(x) for x in logged(trainer, "mtp_loss"))
    assert any(bias.abs().max() > 0 for bias in router_biases(model))  # balancing runs under PEFT too


def test_packed_documents_stay_apart(tok):
    """What packing relies on: with position ids restarting per document, no attention and no MTP target crosses
    a document boundary (logits and MTP loss match the documents run one by one)."""
    torch.manual_seed(0)
    model = tiny_model(tok)
    first, second = torch.tensor([[1, 5, 6, 7, 8, 2]]), torch.tensor([[1, 9, 10, 11, 2]])
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]
    out = model(input_ids=packed, position_ids=positions, labels=packed, use_cache=False)
    alone = [model(input_ids=ids, labels=ids, use_cache=False) for ids in (first, second)]
    torch.testing.assert_close(out.logits, torch.cat([a.logits for a in alone], dim=1), atol=1e-5, rtol=1e-4)
    # the packed MTP loss is the token-weighted mean of the documents' (4 and 3 depth-1 targets)
    expected = (4 * alone[0].mtp_loss + 3 * alone[1].mtp_loss) / 7
    torch.testing.assert_close(out.mtp_loss, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ GRPO


def run_grpo(tok, tmp_path, beta: float, peft_config=None):
    torch.manual_seed(0)
    model = tiny_model(tok)
    config = DeepSeekGRPOConfig(
        output_dir=str(tmp_path),
        **{**FAST_ARGS, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3},
        num_generations=4,
        max_completion_length=12,
        beta=beta,
    )
    rewards = get_reward_funcs(["accuracy", "format", "tag_count", "countdown", {"name": "cosine", "max_len": 12}])
    trainer = DeepSeekGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=grpo_problems(),
        processing_class=tok,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_logs_finite_reward_and_completion_metrics(tok, tmp_path, beta):
    trainer = run_grpo(tok, tmp_path, beta)
    assert (trainer.ref_model is not None) == (beta > 0)
    rows = [row for row in trainer.state.log_history if "reward" in row]
    assert len(rows) == 2
    keys = [
        "reward",
        "reward_std",
        "rewards/accuracy_reward/mean",
        "rewards/format_reward/mean",
        "rewards/tag_count_reward/mean",
        "rewards/cosine_scaled_reward/mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "entropy",
        "mtp_loss",
        "balance/max_violation",
        "balance/load_entropy",
        *(["kl"] if beta > 0 else []),
    ]
    for row in rows:
        for key in keys:
            assert key in row and math.isfinite(row[key]), key
        assert 0 < row["completions/mean_length"] <= 12


def test_grpo_with_lora_uses_the_adapter_free_model_as_reference(tok, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "o_proj"])
    trainer = run_grpo(tok, tmp_path, beta=0.04, peft_config=lora)
    assert trainer.ref_model is None  # TRL disables the adapter instead
    assert all(math.isfinite(x) for x in logged(trainer, "kl"))


@pytest.mark.parametrize("positive_only", [False, True])
def test_grpo_positive_advantages_only_zeroes_the_negative_ones(tok, tmp_path, monkeypatch, positive_only):
    from trl import GRPOTrainer

    config = DeepSeekGRPOConfig(
        output_dir=str(tmp_path), **FAST_ARGS, per_device_train_batch_size=4, num_generations=4,
        positive_advantages_only=positive_only,
    )  # fmt: skip
    trainer = DeepSeekGRPOTrainer(
        model=tiny_model(tok), reward_funcs=get_reward_funcs(["accuracy"]), args=config,
        train_dataset=grpo_problems(), processing_class=tok,
    )  # fmt: skip
    advantages = torch.tensor([-1.5, 0.5, 1.0, -0.25])
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: {"advantages": advantages})
    got = trainer._generate_and_score_completions([])["advantages"]
    assert torch.equal(got, advantages.clamp(min=0) if positive_only else advantages)


def odd_length_reward(prompts, completions, **columns) -> list[float]:
    """1.0 for a completion of odd length: rewards that differ within a group, so the policy gradient is not zero."""
    return [float(len(c[-1]["content"] if isinstance(c, list) else c) % 2) for c in completions]


def test_grpo_trains_only_the_trainable_parameters(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tok)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = DeepSeekGRPOConfig(
        output_dir=str(tmp_path), **{**FAST_ARGS, "max_steps": 1, "per_device_train_batch_size": 8},
        learning_rate=1e-2, num_generations=8, max_completion_length=12, mtp_loss_weight=0.0,
        trainable_parameters=r"^(lm_head|model\.norm)\.",
    )  # fmt: skip
    trainer = DeepSeekGRPOTrainer(
        model=model, reward_funcs=[odd_length_reward], args=config, train_dataset=grpo_problems(), processing_class=tok
    )  # fmt: skip
    trainer.train()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved == {"lm_head.weight", "model.norm.weight"}
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze_except(model, "no_such_parameter")


# ------------------------------------------------------------------------------------------------ command line


def test_train_command_runs_r1_sft_then_grpo_and_checkpoints_reload(tmp_path):
    root = f"output_root={tmp_path}"
    cli_main(
        ["train", "sft", "--recipe", "r1", root, TINY_MODEL_OVERRIDE, "sft.data.tasks={countdown: 8, addition: 8}"]
        + ["max_steps=3", "per_device_train_batch_size=4", "logging_steps=1", "save_strategy=no", "report_to=none"]
    )
    cli_main(
        ["train", "grpo", "--recipe", "r1", root, "grpo.data.tasks={countdown: 4, arithmetic: 4}", "max_steps=2"]
        + ["per_device_train_batch_size=4", "num_generations=4", "max_completion_length=12", "beta=0.001"]
        + ["logging_steps=1", "save_strategy=no", "report_to=none"]
    )
    for stage, figures in (("sft", {"loss", "accuracy", "balance"}), ("grpo", {"loss", "reward", "balance"})):
        out = tmp_path / stage
        model = AutoModelForCausalLM.from_pretrained(out)
        assert type(model).__name__ == "DeepSeekForCausalLM"
        assert figures <= {p.stem for p in (out / "plots").glob("*.png")}
        assert (out / "metrics.csv").read_text().startswith("step,")
    grpo_start = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert grpo_start.config.hidden_size == 64  # the GRPO stage started from the SFT output


def test_train_all_runs_every_stage_of_the_recipe_in_order_each_from_the_last(tmp_path, capsys):
    stages = ["sft", "sft_continue", "sft_anneal", "grpo", "grpo_continue", "sft_turns", "sft_turns_continue"]
    small = [f"{s}.args.max_steps=1" for s in stages] + [f"{s}.data.tasks={{addition: 8}}" for s in stages]
    grpo = [
        f"{s}.args.{key}"
        for s in ("grpo", "grpo_continue")
        for key in (
            "per_device_train_batch_size=4",
            "num_generations=4",
            "max_completion_length=12",
            "save_strategy=no",
        )
    ]
    cli_main(["train", "all", "--recipe", "r1_tiny", f"output_root={tmp_path}", TINY_MODEL_OVERRIDE, *small, *grpo])
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if "saved model" in line]
    assert printed == stages
    for stage in stages:  # r1_tiny's own model is 96 wide: every stage after the first started from the one before
        assert AutoModelForCausalLM.from_pretrained(tmp_path / stage).config.hidden_size == 64
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    for argv, message in (  # mistakes end in one line and exit status 2
        (["train", "all", "--recipe", "r1_tiny", "max_steps=1"], "name the stage"),
        (["train", "nope", "--recipe", "r1_tiny"], "no stage 'nope'.*sft_continue"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_distill_recipe_trains_on_checked_traces_only(tmp_path):
    from hf_deepseek.trainers.recipes import apply_overrides, build_dataset, load_recipe

    def trace(task, question, answer, completion, **extra):
        return {"task": task, "question": question, "answer": answer, "completion": completion, **extra}

    traces = [
        trace("arithmetic", "Calculate 2 + 2.", "4", "<think>2+2=4</think><answer>4</answer>"),
        trace("arithmetic", "Calculate 3 * 3.", "9", "<think>3*3=6</think><answer>6</answer>"),  # wrong
        trace(
            "countdown",
            "Use 3 7 25 to make 54.",
            "(25-7)*3",
            "<think>25-7=18, 18*3=54</think><answer>(25-7)*3</answer>",
            numbers=[3, 7, 25],
            target=54,
        ),
        trace("arithmetic", "Calculate 1 + 1.", "2", "2"),  # malformed
    ]
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(row) + "\n" for row in traces))
    recipe = apply_overrides(load_recipe("distill"), "sft", [f"output_root={tmp_path}"])
    dataset = build_dataset(recipe, "sft")
    assert len(dataset) == 2
    assert dataset[1]["messages"][-1]["content"].endswith("<answer>(25-7)*3</answer>")
    cli_main(["train", "sft", "--recipe", "distill", f"output_root={tmp_path}", TINY_MODEL_OVERRIDE, "max_steps=1"])
    assert (tmp_path / "sft" / "config.json").is_file()


def test_recipes_load_and_overrides_apply():
    from hf_deepseek import DeepSeekConfig
    from hf_deepseek.trainers.recipes import apply_overrides, load_recipe, recipe_names, stage_output_dir

    assert {"r1_zero", "r1", "distill"} <= set(recipe_names())
    for name in recipe_names():  # every shipped recipe describes a valid model
        DeepSeekConfig(**load_recipe(name)["model"]["config"])
    overrides = ["beta=0", "grpo.data.seed=7", "output_root=/x", "learning_rate=3e-6", "save_strategy=no"]
    recipe = apply_overrides(load_recipe("r1"), "grpo", overrides)
    assert recipe["grpo"]["args"]["beta"] == 0 and recipe["grpo"]["data"]["seed"] == 7
    assert recipe["grpo"]["args"]["learning_rate"] == 3e-6 and recipe["grpo"]["args"]["save_strategy"] == "no"
    assert stage_output_dir(recipe, "sft") == "/x/sft" and recipe["grpo"]["init"] == "sft"
    assert "sft" not in load_recipe("r1_zero") and "grpo" not in load_recipe("distill")
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(recipe, "grpo", ["beta"])
    with pytest.raises(ValueError, match="no recipe"):
        load_recipe("nope")


def test_load_best_model_at_end_restores_every_weight(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tok)
    args = {**FAST_ARGS, "save_strategy": "steps", "eval_strategy": "steps", "save_steps": 2, "eval_steps": 2}
    config = DeepSeekSFTConfig(
        output_dir=str(tmp_path),
        **{**args, "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 3e-3},
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # "best" is the earlier, higher-loss checkpoint: loading it must replace every weight
        router_bias_update_speed=0.01,
    )
    dataset = addition_chats(32)
    trainer = DeepSeekSFTTrainer(
        model=model, args=config, train_dataset=dataset, eval_dataset=dataset.select(range(8)), processing_class=tok
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2"), trainer.state.best_model_checkpoint
    best = AutoModelForCausalLM.from_pretrained(trainer.state.best_model_checkpoint).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, best[name], msg=name)


def test_own_losses_run_inside_the_forward_that_ddp_wraps(tok, tmp_path):
    """DDP (find_unused_parameters=True, Trainer's default without checkpointing) only accepts gradients from
    parameters the wrapped forward used: the MTP loss must be computed inside it, not after it."""
    import os

    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = tiny_model(tok)
    config = DeepSeekSFTConfig(output_dir=str(tmp_path), **{**FAST_ARGS, "per_device_train_batch_size": 4})
    trainer = DeepSeekSFTTrainer(model=model, args=config, train_dataset=addition_chats(8), processing_class=tok)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    port = 29500 + (os.getpid() + 500) % 1000
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model, find_unused_parameters=True)
        trainer.compute_loss(wrapped, inputs).backward()
    finally:
        torch.distributed.destroy_process_group()
    assert all(
        p.grad is not None and p.grad.norm() > 0 for n, p in model.named_parameters() if n in mtp_parameter_names(model)
    )


def test_trainers_update_with_triton_adamw_where_torchs_adamw_would_run_on_cuda(tok, tmp_path, monkeypatch):
    from hf_deepseek.kernels.adamw import TritonAdamW
    from hf_deepseek.trainers import deepseek_losses

    def optimizer_of(**args):
        torch.manual_seed(0)
        model = tiny_model(tok)
        config = DeepSeekSFTConfig(output_dir=str(tmp_path), **{**FAST_ARGS, "max_steps": 2, **args})
        trainer = DeepSeekSFTTrainer(model=model, args=config, train_dataset=addition_chats(16), processing_class=tok)
        before = [p.detach().clone() for p in model.parameters()]
        trainer.train()
        moved = sum(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        return trainer.optimizer.optimizer, moved  # inside accelerate's wrapper

    torchs, moved = optimizer_of()  # on the CPU: torch's AdamW
    assert type(torchs) is torch.optim.AdamW and moved > 0
    # as on CUDA: transformers' AdamW arguments and parameter groups, our class, a working update
    monkeypatch.setattr(deepseek_losses, "use_triton_adamw", lambda optim, device: optim == "adamw_torch_fused")
    ours, moved = optimizer_of()
    assert type(ours) is TritonAdamW and moved > 0
    assert [(g["lr"], g["weight_decay"], g["betas"], g["eps"], len(g["params"])) for g in ours.param_groups] == [
        (g["lr"], g["weight_decay"], g["betas"], g["eps"], len(g["params"])) for g in torchs.param_groups
    ]
    assert all(float(s["step"]) == 2 for s in ours.state.values())
    kept, _ = optimizer_of(triton_adamw=False)  # turned off
    assert type(kept) is torch.optim.AdamW
