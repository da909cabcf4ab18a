"""MTP speculative decoding's device loop (`generation/fast_speculative.py`) on the CPU: plain greedy `generate()`'s
tokens and the eager speculative loop's statistics (the embedded checkpoint on its own task's prompts and a random
tiny model; batch 1 and left-padded batches whose rows keep different numbers of drafts; rows ending at eos), one
compiled graph across calls with no recompilation and no graph break, host reads that do not grow with the number
of steps, and the eager loop as the fallback."""

import collections
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from transformers.generation.configuration_utils import CompileConfig

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.generation import fast_speculative as fs

CHECKPOINT = Path(__file__).parents[1] / "checkpoints" / "hf-deepseek-r1-tiny"
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__index__, torch.Tensor.__float__}  # fmt: skip


def embedded_model_and_prompts(count: int):
    """The embedded checkpoint and `count` of its held-out addition prompts, left-padded."""
    from transformers import AutoTokenizer

    from hf_deepseek.evals.task_data import load_rows, prompt_text

    if not (CHECKPOINT / "config.json").is_file():
        pytest.skip("the embedded checkpoint is not shipped in this tree")
    model = DeepSeekForCausalLM.from_pretrained(CHECKPOINT).eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(row)}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for row in load_rows("addition")["test"][:count]
    ]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return model, ids, mask, tokenizer.eos_token_id


def random_model_and_prompts(batch: int):
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(initializer_range=0.1, num_nextn_predict_layers=1)).eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, 9))
    mask = torch.ones_like(ids)
    mask[1:, :3] = 0  # rows after the first left-padded
    return model, ids.masked_fill(mask == 0, 0), mask


def plain_and_fast(model, ids, mask, **kwargs):
    """Plain greedy generate() (transformers' loop), the eager speculative loop and the device loop; the stats of
    both speculative loops."""
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)
    plain = model.generate(ids, **kwargs)
    eager = model.generate(ids, mtp_speculative=True, fast_loop=False, **kwargs)
    eager_stats = model.last_speculative_stats
    fast = model.generate(ids, mtp_speculative=True, fast_loop=True, **kwargs)
    return plain, eager, fast, eager_stats, model.last_speculative_stats


@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]], ids=["prompt a", "prompt b", "batch 3"])
def test_embedded_checkpoint_gives_plain_greedy_tokens(rows):
    model, ids, mask, eos = embedded_model_and_prompts(3)
    ids, mask = ids[rows], mask[rows]
    ids, mask = ids[:, mask.sum(0) > 0], mask[:, mask.sum(0) > 0]  # no all-padding column
    plain, eager, fast, eager_stats, stats = plain_and_fast(model, ids, mask, max_new_tokens=160, eos_token_id=eos)
    assert torch.equal(fast, plain) and torch.equal(eager, plain)
    assert (fast[:, ids.shape[1] :] == eos).any(dim=1).all()  # every row answered and ended
    assert stats == eager_stats
    assert stats["acceptance_rate"] > 0.8 and stats["tokens_per_step"] > 1.5


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("new_tokens", [1, 2, 31])
def test_random_model_gives_plain_greedy_tokens(batch, new_tokens):
    model, ids, mask = random_model_and_prompts(batch)
    plain, eager, fast, eager_stats, stats = plain_and_fast(model, ids, mask, max_new_tokens=new_tokens,
                                                            eos_token_id=[])  # fmt: skip
    assert torch.equal(fast, plain) and torch.equal(eager, plain)
    assert stats == eager_stats
    if new_tokens > 2:  # drafts both kept and rejected: the cache was rewound
        assert 0 < stats["accepted"] < stats["draft_tokens"]


def test_rows_ending_at_different_steps():
    model, ids, mask = random_model_and_prompts(3)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 5])  # ends row 1 early; other rows later or never
    plain, eager, fast, eager_stats, stats = plain_and_fast(model, ids, mask, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(fast, plain) and stats == eager_stats
    ended = (fast[:, ids.shape[1] :] == eos).any(dim=1)
    assert ended.any()


def compiled_on_cpu() -> CompileConfig:
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # CPU: transformers would not compile otherwise
    return config


def test_compiled_step_is_one_graph_across_calls():
    """After the first call compiles the step, other prompt lengths, budgets and eos settings reuse the graph."""
    model, ids, mask = random_model_and_prompts(2)
    config = compiled_on_cpu()
    torch.compiler.reset()
    counters.clear()
    try:
        calls = [(ids, 24, []), (ids[:, 2:], 24, 7), (ids, 10, [7, 9])]
        for index, (prompt, new_tokens, eos) in enumerate(calls):
            kwargs = dict(attention_mask=mask[:, -prompt.shape[1] :], max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, eos_token_id=eos)  # fmt: skip
            plain = model.generate(prompt, **kwargs)
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                fast = model.generate(prompt, mtp_speculative=True, fast_loop=True, compile_config=config, **kwargs)
            assert torch.equal(fast, plain)
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch.compiler.reset()


class HostReads(TorchFunctionMode):
    """Counts tensor reads on the host (each a device-to-host synchronisation on a GPU) by the caller's function."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_host_reads_do_not_grow_with_the_steps():
    """Compiled, a generation reads the device a fixed number of times (prefill, stopping checks, the result),
    however many speculative steps it takes; the eager loop reads it several times per step."""
    model, ids, mask = random_model_and_prompts(1)
    config = compiled_on_cpu()
    torch.compiler.reset()
    totals, steps = {}, {}
    try:
        with HostReads() as counter:
            for new_tokens in (16, 48):
                kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
                model.generate(ids, mtp_speculative=True, fast_loop=True, compile_config=config, **kwargs)  # compile
                counter.reads.clear()
                model.generate(ids, mtp_speculative=True, fast_loop=True, compile_config=config, **kwargs)
                totals[new_tokens], steps[new_tokens] = sum(counter.reads.values()), model.last_speculative_stats
                counter.reads.clear()
                model.generate(ids, mtp_speculative=True, fast_loop=False, **kwargs)
                eager_reads = sum(counter.reads.values())
    finally:
        torch.compiler.reset()
    more_steps = steps[48]["steps"] - steps[16]["steps"]
    assert more_steps >= 16
    # the stopping checks: one per burst, bursts shrinking with what is left (about log2 of the budget)
    assert totals[48] - totals[16] <= math.ceil(math.log2(48)) - math.floor(math.log2(16)) + 1
    assert eager_reads > 2 * steps[48]["steps"]


def test_the_device_loop_is_the_default_only_on_cuda_for_greedy_single_drafts(monkeypatch):
    model, ids, mask = random_model_and_prompts(1)
    config = model.generation_config
    assert not fs.wants_fast_speculative(model, config, None, None)  # CPU: the eager loop unless asked
    monkeypatch.setattr(DeepSeekForCausalLM, "device", property(lambda self: torch.device("cuda")))
    assert fs.wants_fast_speculative(model, config, None, None)
    assert not fs.wants_fast_speculative(model, config, None, False)  # fast_loop=False: the eager loop
    model.train()
    assert not fs.wants_fast_speculative(model, config, None, None)  # training mode: no compiled loop
    model.eval()
    assert not fs.wants_fast_speculative(model, config, 2, None)
    sampling = config.__class__(do_sample=True)
    assert not fs.wants_fast_speculative(model, sampling, None, None)
    with pytest.raises(ValueError, match="sampling"):
        fs.wants_fast_speculative(model, sampling, None, True)
    deeper = DeepSeekForCausalLM(tiny_config(num_nextn_predict_layers=2)).eval()
    assert not fs.wants_fast_speculative(deeper, config, None, None)  # two drafts a step: the eager loop
    assert fs.wants_fast_speculative(deeper, config, 1, None)


def test_a_failing_device_loop_falls_back_to_the_eager_loop(monkeypatch):
    model, ids, mask = random_model_and_prompts(1)
    monkeypatch.setattr(fs, "wants_fast_speculative", lambda model, config, drafts, requested: requested is not False)

    def broken(*args):
        raise RuntimeError("no CUDA graph today")

    monkeypatch.setattr(fs, "compiled_speculative_step", lambda model, config: broken)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0)
    plain = model.generate(ids, **kwargs)
    kwargs["mtp_speculative"] = True
    assert torch.equal(model.generate(ids, **kwargs), plain)  # the eager loop took over
    assert "no CUDA graph today" in model.fast_speculative_error
    with pytest.raises(RuntimeError, match="no CUDA graph"):  # asked for explicitly: the error, not the fallback
        model.generate(ids, fast_loop=True, **kwargs)


@pytest.mark.gpu
def test_compiled_device_loop_on_gpu():
    """On CUDA generate(mtp_speculative=True, fast_loop=True) takes the device loop (Inductor, CUDA graphs); fp32, so
    that its tokens can be compared exactly with plain greedy decoding."""
    model, ids, mask, eos = embedded_model_and_prompts(4)
    model, ids, mask = model.cuda(), ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=eos)
    plain = model.generate(ids, cache_implementation="dynamic", **kwargs)
    fast = model.generate(ids, mtp_speculative=True, fast_loop=True, **kwargs)
    assert model.__dict__.get("_fast_speculative_buffers") is not None  # the device loop ran
    assert model.__dict__.get("fast_speculative_error") is None, model.fast_speculative_error
    assert torch.equal(fast, plain)
    assert model.last_speculative_stats["acceptance_rate"] > 0.8
