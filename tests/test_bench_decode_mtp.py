"""`hf-deepseek bench decode`'s MTP row (`run_mtp_row`) on the CPU: every timed call generates exactly the tokens
asked for even when the model would end at once, a time that noise makes meaningless is reported as such (never as a
negative number), differences from plain greedy decoding are located and sized, task prompts are the default for a
trained checkpoint; and our speculative greedy decoding gives plain greedy's tokens at batch 8 in fp32 with random
prompts whose rows end at different times (the bench's GPU setting that showed a difference in bf16)."""

import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.evals import bench_decode
from hf_deepseek.evals.bench_decode import (
    DecodePlan,
    differences_note,
    resolved_mtp_prompts,
    run_mtp_row,
    token_differences,
)

CHECKPOINTS = Path(__file__).parents[1] / "checkpoints"
TINY = CHECKPOINTS / "hf-deepseek-r1-tiny"


def mtp_plan(new_tokens: int = 6, batch: int = 2, prompts: str = "random") -> DecodePlan:
    return DecodePlan({}, batch_sizes=[batch], contexts=[8], rows=["ours-mtp"], mtp_contexts=[8],
                      mtp_new_tokens=new_tokens, mtp_prompts=prompts)  # fmt: skip


def random_mtp_model() -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    return DeepSeekForCausalLM(tiny_config(initializer_range=0.1, num_nextn_predict_layers=1)).eval()


def record_generate(model, monkeypatch, delay_one_token_s: float = 0.0) -> list[tuple[int, int]]:
    """Wraps `model.generate`: records (max_new_tokens, tokens generated per row) of each call; optionally makes
    every 1-token call slower by `delay_one_token_s`."""
    calls, generate = [], model.generate

    def recorded(ids, max_new_tokens, **kwargs):
        out = generate(ids, max_new_tokens=max_new_tokens, **kwargs)
        if max_new_tokens == 1 and delay_one_token_s:
            time.sleep(delay_one_token_s)
        calls.append((max_new_tokens, out.shape[1] - ids.shape[1]))
        return out

    monkeypatch.setattr(model, "generate", recorded)
    return calls


def test_every_timed_call_generates_the_requested_tokens_even_if_each_token_is_eos(monkeypatch):
    """A model whose every token is end-of-sequence: before, each call stopped after one token and the time per token
    divided the noise between two 1-token calls."""
    model = random_mtp_model()
    model.generation_config.eos_token_id = list(range(model.config.vocab_size))
    model.generation_config.pad_token_id = 0
    calls = record_generate(model, monkeypatch)
    (cell,) = run_mtp_row(model, mtp_plan(new_tokens=6), torch.device("cpu"), lambda message: None)
    assert calls and all(generated == asked for asked, generated in calls), calls
    assert {asked for asked, _ in calls} == {1, 6}
    assert "6 new tokens per row in every call (eos off)" in cell.note, cell.note
    assert "equal to plain greedy: True (eager MTP loop: True)" in cell.note, cell.note
    assert cell.ms_per_step is not None and cell.ms_per_step > 0 and cell.plain_ms_per_token > 0
    assert cell.acceptance_rate is not None and cell.tokens_per_step >= 1


def test_a_time_that_noise_makes_negative_is_not_reported(monkeypatch):
    """The 1-token (prefill) calls made slower than the whole generation: no time per token, no ratio, a note."""
    model = random_mtp_model()
    record_generate(model, monkeypatch, delay_one_token_s=0.3)
    (cell,) = run_mtp_row(model, mtp_plan(new_tokens=3), torch.device("cpu"), lambda message: None)
    assert cell.ms_per_step is None and cell.tokens_per_s is None and cell.speedup_vs_plain is None, cell
    assert cell.plain_ms_per_token is None
    assert "no MTP time" in cell.note and "n/a (timing noise" in cell.note, cell.note
    assert "-" not in f"{cell.ms_per_step}{cell.plain_ms_per_token}"


def test_too_few_new_tokens_to_subtract_the_prefill_is_reported():
    (cell,) = run_mtp_row(random_mtp_model(), mtp_plan(new_tokens=1), torch.device("cpu"), lambda message: None)
    assert cell.ms_per_step is None and "at least 2 new tokens" in cell.note


def test_token_differences_locate_the_first_difference_and_its_logit_gap():
    model = random_mtp_model()
    ids = torch.randint(3, model.config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # a left-padded row
    ids = ids.masked_fill(mask == 0, 0)
    common = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = model.generate(ids, **common)
    other = plain.clone()
    other[2, 7 + 3] = (plain[2, 7 + 3] + 1) % model.config.vocab_size  # row 2 differs from its new token 3 on
    other[2, 7 + 5] = 5
    assert token_differences(model, plain, plain, mask) == []
    (difference,) = token_differences(model, plain, other, mask)
    assert difference["row"] == 2 and difference["new_token"] == 3
    first, second = difference["tokens"]
    assert first == int(plain[2, 10]) and second == int(other[2, 10])
    with torch.no_grad():  # the unpadded prefix, as generate() saw it
        logits = model(input_ids=plain[2:3, 2:10]).logits[0, -1]
    assert difference["logit_gap"] == pytest.approx(abs(float(logits[first] - logits[second])), abs=1e-5)
    assert differences_note([{**difference, "logit_gap": 0.1}], 3).endswith("all near-ties")
    assert "not all near-ties" in differences_note([{**difference, "logit_gap": 3.0}], 3)


def test_task_prompts_are_the_default_for_a_checkpoint_with_a_chat_template(tmp_path):
    model = random_mtp_model()
    model.save_pretrained(tmp_path)  # random weights, no tokenizer: random prompts
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert resolved_mtp_prompts(model, DecodePlan({}, [1], [8])) == "random"
    assert resolved_mtp_prompts(model, DecodePlan({}, [1], [8], mtp_prompts="task")) == "task"
    with pytest.raises(ValueError, match="mtp_prompts"):
        resolved_mtp_prompts(model, DecodePlan({}, [1], [8], mtp_prompts="sums"))
    checkpoint = CHECKPOINTS / "hf-deepseek-r1-add-sub"
    if not (checkpoint / "config.json").is_file():
        pytest.skip("the embedded checkpoint is not shipped in this tree")
    trained = DeepSeekForCausalLM.from_pretrained(checkpoint)
    assert trained.config.num_nextn_predict_layers == 1  # the MTP module the row drafts with
    assert resolved_mtp_prompts(trained, DecodePlan({}, [1], [8])) == "task"
    assert resolved_mtp_prompts(trained, DecodePlan({}, [1], [8], mtp_prompts="random")) == "random"
    ids, mask = bench_decode.mtp_prompts(trained, DecodePlan({}, [1], [8]), 3, 0, torch.device("cpu"))
    assert ids.shape == mask.shape and mask[:, -1].all() and not ids[mask == 0].any()  # left padding, pad 0


@pytest.mark.parametrize("fast_loop", [True, False], ids=["device loop", "eager loop"])
def test_trained_checkpoint_batch_8_random_prompts_gives_plain_greedy_tokens_in_fp32(fast_loop):
    """The bench's GPU cell that differed in bf16 (batch 8, random prompts, pad 0, an all-ones mask, rows that end
    at different steps), in fp32 on the CPU: the same tokens as plain greedy decoding, with eos and without."""
    if not (TINY / "config.json").is_file():
        pytest.skip("the embedded checkpoint is not shipped in this tree")
    model = DeepSeekForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    common = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, max_new_tokens=96)
    plain = model.generate(ids, **common)
    ends = (plain[:, 64:] == model.generation_config.eos_token_id).int().argmax(dim=1)
    assert len(set(ends.tolist())) > 2  # rows end at different steps
    mtp = model.generate(ids, mtp_speculative=True, fast_loop=fast_loop, mtp_draft_tokens=1, **common)
    assert torch.equal(mtp, plain)
    assert 0 < model.last_speculative_stats["accepted"] < model.last_speculative_stats["draft_tokens"]
    common["eos_token_id"] = None
    plain = model.generate(ids, **common)
    mtp = model.generate(ids, mtp_speculative=True, fast_loop=fast_loop, mtp_draft_tokens=1, **common)
    assert plain.shape[1] == 64 + 96 and torch.equal(mtp, plain)
