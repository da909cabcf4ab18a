"""Expert-parallel inference over gloo (2 CPU processes): `load_expert_parallel` reads a `save_pretrained` folder
with only this rank's routed experts, and `generate()` gives the tokens of `from_pretrained` in one process, also
when the ranks stop at different lengths (`synced_gpus=True`)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.parallel import ExpertParallelExperts, load_expert_parallel

WORLD = 2
NEW_TOKENS = (4, 9)  # rank r generates NEW_TOKENS[r] tokens: the ranks finish at different steps


def _prompts(config) -> torch.Tensor:
    return torch.randint(1, config.vocab_size, (2 * WORLD, 7), generator=torch.Generator().manual_seed(5))


def _rank(rank: int, path: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = load_expert_parallel(path)
        shares = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
        mine = _prompts(model.config)[rank::WORLD]
        steps = NEW_TOKENS[rank]
        tokens = model.generate(
            mine, attention_mask=torch.ones_like(mine), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            pad_token_id=0, synced_gpus=True,
        )  # fmt: skip
        experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
        torch.save((tokens, [m.expert_range for m in shares], experts), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_load_expert_parallel_generates_the_tokens_of_one_process(tmp_path):
    config = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    DeepSeekForCausalLM(config).save_pretrained(tmp_path)
    port = 29100 + os.getpid() % 400
    mp.start_processes(_rank, args=(str(tmp_path), port), nprocs=WORLD, join=True, start_method="fork")

    alone = DeepSeekForCausalLM.from_pretrained(tmp_path).eval()
    prompts = _prompts(config)
    whole = dict(alone.named_parameters())
    for rank in range(WORLD):
        tokens, ranges, experts = torch.load(tmp_path / f"rank{rank}.pt")
        first, last = rank * 4, (rank + 1) * 4
        assert ranges == [(first, last)] * 3  # two MoE decoder layers and the MTP layer, 4 of the 8 experts each
        for name, share in experts.items():  # the rank holds its slice of the experts and nothing more
            assert share.shape[0] == 4 and torch.equal(share, whole[name][first:last].detach())
        mine = prompts[rank::WORLD]
        want = alone.generate(
            mine, attention_mask=torch.ones_like(mine), max_new_tokens=NEW_TOKENS[rank],
            min_new_tokens=NEW_TOKENS[rank], do_sample=False, pad_token_id=0,
        )  # fmt: skip
        assert tokens.shape == (2, 7 + NEW_TOKENS[rank]) and torch.equal(tokens, want)


def test_load_expert_parallel_refuses_an_uneven_split(tmp_path, monkeypatch):
    config = tiny_config(n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1)
    DeepSeekForCausalLM(config).save_pretrained(tmp_path)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    with pytest.raises(ValueError, match="^6 routed experts cannot be split evenly over 4 expert-parallel ranks$"):
        load_expert_parallel(tmp_path, group=object())
