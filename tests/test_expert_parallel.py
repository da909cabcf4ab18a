"""Expert parallelism over gloo (2 and 4 CPU processes), alone (the other gradients averaged as DDP does) and with
FSDP2 sharding the other parameters: each rank holds E/P routed experts and its share of the batch; the loss, every
gradient and the next step's loss equal a single process on the whole batch (fp32)."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling.moe import RoutedExperts
from hf_deepseek.parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    fully_shard_around_experts,
    gather_experts,
)

BATCH, LENGTH = 4, 24


def _step(model, ids):
    """The mean loss over this batch's tokens, and its gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2's shards: the whole tensor


def _rank(rank: int, world: int, sharding: str, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                             num_nextn_predict_layers=0)  # fmt: skip
        reference = DeepSeekForCausalLM(config).train()
        ids = torch.randint(0, config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
        parallel = apply_expert_parallel(copy.deepcopy(reference))
        assert sum(isinstance(m, ExpertParallelExperts) for m in parallel.modules()) == 2
        assert not any(type(m) is RoutedExperts for m in parallel.modules())
        if sharding == "fsdp2":
            fully_shard_around_experts(parallel)
            kinds = {n: type(p).__name__ for n, p in parallel.named_parameters()}
            assert {k for n, k in kinds.items() if ".experts." in n} == {"Parameter"}  # split by expert, not FSDP
            assert {k for n, k in kinds.items() if ".experts." not in n} == {"DTensor"}  # the rest sharded

        losses = {"reference": [], "parallel": []}
        for _ in range(2):  # two steps of plain SGD, the second on the updated weights
            losses["reference"].append(_step(reference, ids))
            local = _step(parallel, ids[rank::world])  # this rank's rows of the batch
            dist.all_reduce(local)
            losses["parallel"].append(local / world)  # equal shares: the mean of the means is the batch's mean
            grads = {}
            for name, p in parallel.named_parameters():
                if sharding == "ddp" and ".experts." not in name:  # replicated: averaged as DDP does
                    dist.all_reduce(p.grad)
                    p.grad /= world
                grads[name] = _full(p.grad).clone()
            with torch.no_grad():
                for p in [*reference.parameters(), *parallel.parameters()]:
                    p -= 0.5 * p.grad
        reference_grads = dict(reference.named_parameters())
        first, last = next(m.expert_range for m in parallel.modules() if isinstance(m, ExpertParallelExperts))
        result = {"losses": losses, "max_grad_diff": 0.0, "experts": (first, last)}
        for name, grad in grads.items():
            want = reference_grads[name].grad
            if ".experts." in name:
                want = want[first:last]  # this rank's experts
            result["max_grad_diff"] = max(result["max_grad_diff"], (grad - want).abs().max().item())
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_step_equals_one_process(tmp_path, world, sharding):
    port = 29300 + os.getpid() % 300 + world + (10 if sharding == "fsdp2" else 0)
    args = (world, sharding, port, str(tmp_path))
    mp.start_processes(_rank, args=args, nprocs=world, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [r["experts"] for r in results] == [(r * 8 // world, (r + 1) * 8 // world) for r in range(world)]
    for r in results:
        for want, got in zip(r["losses"]["reference"], r["losses"]["parallel"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert r["losses"]["parallel"][1] < r["losses"]["parallel"][0]  # the step moved the weights
        assert r["max_grad_diff"] < 1e-5, r["max_grad_diff"]


def test_uneven_expert_split_is_refused(monkeypatch):
    experts = RoutedExperts(tiny_config(n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)  # as if in a group of four ranks
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match="6 routed experts cannot be split evenly over 4 expert-parallel ranks"):
        ExpertParallelExperts(experts, group=object())


def _generate_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
        model = DeepSeekForCausalLM(config).eval()
        prompts = torch.randint(1, config.vocab_size, (2 * world, 10), generator=torch.Generator().manual_seed(2))
        common = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # the same step count
        alone = model.generate(prompts, attention_mask=torch.ones_like(prompts), **common)
        apply_expert_parallel(model)
        mine = prompts[rank::world]  # each rank generates for its own prompts; the experts serve all ranks
        together = model.generate(mine, attention_mask=torch.ones_like(mine), **common)
        torch.save((alone[rank::world], together), os.path.join(out_dir, f"gen{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_expert_parallel_generation_gives_the_tokens_of_one_process(tmp_path):
    port = 29300 + os.getpid() % 300 + 40
    mp.start_processes(_generate_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        alone, together = torch.load(tmp_path / f"gen{rank}.pt")
        assert together.shape == (2, 18) and torch.equal(together, alone)


def _resume_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
        model = apply_expert_parallel(DeepSeekForCausalLM(config).train())
        ids = torch.randint(0, config.vocab_size, (2 * world, 16), generator=torch.Generator().manual_seed(3))
        mine = ids[rank::world]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(2):
            _step(model, mine)
            for name, p in model.named_parameters():
                if ".experts." not in name:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
        expected_next = _step(model, mine)  # the run going on without a save
        gather_experts(model)  # whole experts on every rank: the usual checkpoint layout
        if rank == 0:
            model.save_pretrained(os.path.join(out_dir, "ckpt"))
        dist.barrier()
        resumed = apply_expert_parallel(DeepSeekForCausalLM.from_pretrained(os.path.join(out_dir, "ckpt")).train())
        torch.save((expected_next, _step(resumed, mine)), os.path.join(out_dir, f"resume{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_expert_parallel_checkpoint_saves_the_usual_layout_and_resumes(tmp_path):
    port = 29300 + os.getpid() % 300 + 50
    mp.start_processes(_resume_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    reloaded = DeepSeekForCausalLM.from_pretrained(tmp_path / "ckpt")  # one process, no parallelism
    assert all(type(m) is not ExpertParallelExperts for m in reloaded.modules())
    assert next(m for m in reloaded.modules() if isinstance(m, RoutedExperts)).gate_up_proj.shape[0] == 8
    for rank in range(2):
        expected, resumed = torch.load(tmp_path / f"resume{rank}.pt")
        torch.testing.assert_close(resumed, expected, rtol=1e-6, atol=1e-6)
