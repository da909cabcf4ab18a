"""Training on several processes (gloo, two CPU processes): FSDP2-sharded models and the SFT trainer keep the router
biases identical on every rank, and `hf-deepseek train --num-processes` builds the accelerate launch.

accelerate turns FSDP on only for GPUs, so the trainer runs here under DDP (same balancer, same all-reduce); FSDP2
itself is applied with torch's `fully_shard`, one unit per decoder / MTP layer as in `trainers/accelerate/fsdp2.yaml`.
The GPU run of that config through accelerate is in docs/PERF.md.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from trainer_helpers import FAST_ARGS, addition_chats, router_biases, tiny_model

from hf_deepseek.cli import build_parser
from hf_deepseek.data import build_tokenizer
from hf_deepseek.trainers.balancing import RouterBiasBalancer
from hf_deepseek.trainers.launch import ACCELERATE_CONFIGS_DIR, launch_command
from hf_deepseek.trainers.sft import DeepSeekSFTConfig, DeepSeekSFTTrainer

WORLD = 2


def _batches(rank: int, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(3, 60, (2, 12), generator=gen) for _ in range(steps)]


def _fsdp2_rank(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = tiny_model(build_tokenizer())
        for layer in model.model.layers:  # decoder layers and the MTP module, as the accelerate config wraps them
            fully_shard(layer)
        fully_shard(model)
        balancer = RouterBiasBalancer(model.model, model.routers(), gamma=0.01)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        biases, losses = [], []
        for step, ids in enumerate(_batches(rank, 3)):
            with balancer.recording():
                output = model(input_ids=ids, labels=ids)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            balancer.step(step, 10)
            biases.append(router_biases(model))
            losses.append(output.mtp_loss.item())
        sharded = type(model.model.layers[0].self_attn.kv_b_proj.weight).__name__
        torch.save((biases, losses, sharded), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_ranks_keep_identical_router_biases(tmp_path):
    port = 29700 + os.getpid() % 500
    mp.start_processes(_fsdp2_rank, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    (biases0, mtp0, sharded), (biases1, _, _) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert sharded == "DTensor"  # the parameters really are sharded
    assert all(torch.isfinite(torch.tensor(mtp0)))  # the MTP module runs inside its FSDP unit
    for step0, step1 in zip(biases0, biases1, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(step0, step1, strict=True))

    # the first update follows the expert counts of both ranks' batches together, as one process would count them
    torch.manual_seed(0)
    model = tiny_model(build_tokenizer())
    balancer = RouterBiasBalancer(model.model, model.routers(), gamma=0.01)
    with torch.no_grad(), balancer.recording():
        for rank in range(WORLD):
            model(input_ids=_batches(rank, 1)[0])
    balancer.step(0, 10)
    assert all(torch.equal(a, b) for a, b in zip(biases0[0], router_biases(model), strict=True))


def _trainer_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok)
    args = DeepSeekSFTConfig(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=4, router_bias_update_speed=0.01, **FAST_ARGS
    )
    dataset = addition_chats(16, seed=rank)
    trainer = DeepSeekSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    trainer.train()
    torch.save(
        (trainer.accelerator.num_processes, router_biases(trainer.deepseek_model)),
        os.path.join(out_dir, f"trainer{rank}.pt"),
    )


def test_sft_trainer_ranks_keep_identical_router_biases(tmp_path):
    port = 30300 + os.getpid() % 500
    mp.start_processes(_trainer_rank, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    (processes, biases0), (_, biases1) = (torch.load(tmp_path / f"trainer{r}.pt") for r in range(WORLD))
    assert processes == WORLD
    assert any(b.abs().sum() > 0 for b in biases0)  # the biases moved
    assert all(torch.equal(a, b) for a, b in zip(biases0, biases1, strict=True))


def test_num_processes_launches_accelerate_with_the_shipped_fsdp2_config():
    args, extra = build_parser().parse_known_args(
        ["train", "sft", "--recipe", "r1", "--num-processes", "2", "max_steps=5"]
    )
    overrides = [*args.overrides, *extra]
    command = launch_command(args.stage, args.recipe, overrides, args.num_processes, args.accelerate_config)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    config = command[command.index("--config_file") + 1]
    assert config == str(ACCELERATE_CONFIGS_DIR / "fsdp2.yaml")
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-6:] == ["hf_deepseek.cli", "train", "sft", "--recipe", "r1", "max_steps=5"]
    fsdp = yaml.safe_load(Path(config).read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    # every layer class the config wraps exists in the model's no-split list
    from hf_deepseek import DeepSeekForCausalLM

    wrapped = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped == set(DeepSeekForCausalLM._no_split_modules)
    with pytest.raises(ValueError, match="fsdp2"):
        launch_command("sft", "r1", [], 2, "zero9")
