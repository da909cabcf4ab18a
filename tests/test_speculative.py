"""MTP self-speculative decoding: greedy output equals plain greedy `generate` at batch 1 and 8 (left padding, rows
ending at eos mid-batch) whatever the drafts (the model's own MTP module, a perfect, a mixed and a terrible
drafter); sampling keeps plain sampling's distribution (the acceptance rule in closed form, and the joint
distribution of the first three tokens); the drafts are the MTP module's predictions; acceptance is counted."""

import app_helpers
import pytest
import torch
from app_helpers import FINITE_SCRIPT, scripted_chat_model
from conftest import tiny_config
from transformers import GenerationConfig
from transformers.generation import TopKLogitsWarper

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.data import build_tokenizer
from hf_deepseek.modeling import speculative
from hf_deepseek.modeling.speculative import (
    DraftStats,
    MTPDrafter,
    acceptance_probability,
    mtp_greedy_generate,
    mtp_speculative_stream,
    residual_distribution,
)

PROMPT_LENGTHS = [7, 3, 10, 5, 1, 9, 4, 10]  # batch 8, left-padded to 10
NEW = 24
PAD = 0
STATS_KEYS = {"acceptance_rate", "tokens_per_step", "draft_tokens", "accepted", "steps"}


def random_model(seed: int, **overrides) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(tiny_config(**{"initializer_range": 0.1, **overrides})).eval()


def left_padded_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(4, 97, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def generate(model, ids, mask, speculative_decoding: bool, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD, "eos_token_id": [], **kwargs}
    return model.generate(ids, attention_mask=mask, mtp_speculative=speculative_decoding, **kwargs)


def track_rows(monkeypatch) -> None:
    """Gives the drafter `rows`: the original batch index of each row it still drafts for (rows that end leave)."""
    prefill, select = MTPDrafter.prefill, MTPDrafter.select

    def tracking_prefill(self, hidden, *args):
        self.rows = list(range(hidden.shape[0]))
        return prefill(self, hidden, *args)

    def tracking_select(self, keep):
        self.rows = [self.rows[i] for i in keep.tolist()]
        select(self, keep)

    monkeypatch.setattr(MTPDrafter, "prefill", tracking_prefill)
    monkeypatch.setattr(MTPDrafter, "select", tracking_select)


def install_oracle(monkeypatch, reference: torch.Tensor, mask: torch.Tensor, wrong) -> None:
    """Replace draft i (1..D) by the reference's token (a wrong one where `wrong(position + i)`) after the MTP
    modules have run, so their caches stay in step."""
    track_rows(monkeypatch)
    width, vocab = mask.shape[1], reference.max().item() + 2
    lengths = mask.sum(1).tolist()

    def fix(drafter, drafts, positions):
        fixed = drafts.clone()
        for b, (row, t) in enumerate(zip(drafter.rows, positions.tolist(), strict=True)):
            for i in range(drafts.shape[1]):
                index = width - lengths[row] + t + 2 + i  # drafted from the entry at position t: token t+2+i
                target = reference[row, index].item() if index < reference.shape[1] else drafts[b, i].item()
                fixed[b, i] = (target + 1) % vocab if wrong(t + i) else target
        return fixed

    prefill, step = MTPDrafter.prefill, MTPDrafter.step

    def oracle_prefill(self, hidden, next_ids, attention_mask, position_ids):
        drafts, q = prefill(self, hidden, next_ids, attention_mask, position_ids)
        return fix(self, drafts, position_ids[:, -1]), q

    def oracle_step(self, hidden, next_ids, slots, position_ids, last):
        drafts, q = step(self, hidden, next_ids, slots, position_ids, last)
        return fix(self, drafts, position_ids[torch.arange(len(last)), last]), q

    monkeypatch.setattr(MTPDrafter, "prefill", oracle_prefill)
    monkeypatch.setattr(MTPDrafter, "step", oracle_step)


DRAFTERS = {
    "mtp module": None,
    "perfect": lambda t: False,
    "mixed": lambda t: t % 3 == 0,
    "terrible": lambda t: True,
}


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("lengths", [[7], PROMPT_LENGTHS], ids=["batch1", "batch8"])
@pytest.mark.parametrize("depths", [1, 2], ids=["1 draft", "2 drafts"])
def test_greedy_output_equals_plain_greedy_generate(monkeypatch, drafter, lengths, depths):
    model = random_model(0, num_nextn_predict_layers=depths)
    ids, mask = left_padded_batch(lengths, seed=1)
    free = generate(model, ids, mask, False)
    # an eos that some rows produce early and others later or never: rows end mid-batch, the rest go on
    eos = free[0, ids.shape[1] + 4].item()
    reference = generate(model, ids, mask, False, eos_token_id=eos)
    if DRAFTERS[drafter] is not None:  # the oracle reads greedy decoding without eos, a few tokens further
        install_oracle(monkeypatch, generate(model, ids, mask, False, max_new_tokens=NEW + 4), mask, DRAFTERS[drafter])
    out = generate(model, ids, mask, True, eos_token_id=eos)
    assert torch.equal(out, reference)
    stats = model.last_speculative_stats
    assert set(stats) == STATS_KEYS and stats["accepted"] <= stats["draft_tokens"]
    if drafter == "perfect":
        assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_step"] > 1.5
    elif drafter == "mixed":
        assert 0.2 < stats["acceptance_rate"] < 0.9
    elif drafter == "terrible":
        assert stats["acceptance_rate"] == 0.0 and stats["tokens_per_step"] == 1.0
    if len(lengths) > 1:
        new = reference[:, ids.shape[1] :]
        ended = (new == eos).any(dim=1)
        assert ended.any() and not ended.all()  # the batch mixes rows that ended and rows that ran to the limit


def test_acceptance_counts_at_batch_one():
    """Each main pass after the prefill verifies one draft; it commits two tokens when the draft is right."""
    model = random_model(3)
    ids, mask = left_padded_batch([7], seed=3)
    for limit in (1, 2, 5, NEW):
        out = generate(model, ids, mask, True, max_new_tokens=limit)
        assert torch.equal(out, generate(model, ids, mask, False, max_new_tokens=limit))
    stats = model.last_speculative_stats
    assert stats["steps"] == stats["draft_tokens"] + 1
    assert NEW <= 1 + stats["draft_tokens"] + stats["accepted"] <= NEW + 1  # the last pass may overshoot by one
    assert stats["tokens_per_step"] == pytest.approx(NEW / stats["steps"])


@pytest.mark.parametrize("depths", [1, 2], ids=["1 draft", "2 drafts"])
def test_a_trained_like_mtp_module_is_always_accepted_in_a_batch(monkeypatch, depths):
    """The scripted model's MTP modules predict the script 1 (and 2) tokens further: every draft is right, rows
    starting at different points of the script end at eos at different steps."""
    monkeypatch.setattr(app_helpers, "tiny_config", lambda **k: tiny_config(**k, num_nextn_predict_layers=depths))
    model = scripted_chat_model(FINITE_SCRIPT)
    tokenizer = build_tokenizer()
    script = tokenizer.convert_tokens_to_ids(FINITE_SCRIPT)
    starts = [0, 1, 3, 6, 0, 2]
    ids = torch.full((len(starts), 4), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, start in enumerate(starts):
        ids[row, -1 - row % 3 :] = torch.tensor([5, 20, script[start]][-1 - row % 3 :])
        mask[row, -1 - row % 3 :] = 1
    kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    out = generate(model, ids, mask, True, **kwargs)
    assert torch.equal(out, generate(model, ids, mask, False, **kwargs))
    assert out.shape[1] == 4 + len(script) - 1  # the row starting at the script's first token ends last
    stats = model.last_speculative_stats
    assert stats["acceptance_rate"] == 1.0
    assert stats["tokens_per_step"] > 1 + 0.5 * depths


def test_the_stream_commits_two_tokens_per_pass_with_a_perfect_drafter():
    model = scripted_chat_model(FINITE_SCRIPT)
    prompt = torch.tensor([[1, 5, 20, 2, 6]])  # ... <|assistant|>
    stats = DraftStats()
    tokens = [t for chunk in mtp_speculative_stream(model, prompt, 64, eos_token_id=2, stats=stats) for t in chunk]
    reference = model.generate(prompt, max_new_tokens=64, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert tokens == reference[0, 5:].tolist()
    assert stats.acceptance_rate == 1.0 and len(tokens) == 11 and stats.main_passes == 6
    out, one = mtp_greedy_generate(model, prompt, 64, eos_token_id=2)
    assert torch.equal(out, reference) and one.as_dict()["steps"] == 6


@pytest.mark.parametrize("depths", [1, 2], ids=["1 draft", "2 drafts"])
def test_drafts_are_the_mtp_modules_predictions_in_a_training_forward(monkeypatch, depths):
    """Draft d_i is what MTP depth i predicts in a training forward over the committed tokens followed by d_1 ..
    d_{i-1} (what it chains on): the incremental drafter (own latent caches, holes, provisional entries) computes
    what training computes. Batch 2, drafts replaced by an oracle right 2 times in 3, so rows keep different
    numbers of drafts and the caches get holes in one row only."""
    model = random_model(3, num_nextn_predict_layers=depths)
    ids, mask = left_padded_batch([6, 4], seed=5)
    new_tokens = 12
    records = []  # (row, position P of the newest cached token, the drafter's own drafts, their logits [D, V])
    prefill, step = MTPDrafter.prefill, MTPDrafter.step

    class LogitsRecorder:
        def __init__(self, chooser):
            self.chooser, self.logits = chooser, []

        def choose(self, logits):
            self.logits.append(logits)
            return self.chooser.choose(logits)

    def record(drafter, newest, drafts):
        logits = torch.stack(drafter.chooser.logits, dim=1)  # [B, D, V], one per depth
        drafter.chooser.logits = []
        records.extend(zip(drafter.rows, newest.tolist(), drafts.tolist(), logits, strict=True))

    def recording_prefill(self, hidden, next_ids, attention_mask, position_ids):
        self.chooser = LogitsRecorder(self.chooser)
        drafts, q = prefill(self, hidden, next_ids, attention_mask, position_ids)
        record(self, position_ids[:, -1], drafts)
        return drafts, q

    def recording_step(self, hidden, next_ids, slots, position_ids, last):
        drafts, q = step(self, hidden, next_ids, slots, position_ids, last)
        record(self, position_ids[torch.arange(len(last)), last], drafts)
        return drafts, q

    monkeypatch.setattr(MTPDrafter, "prefill", recording_prefill)
    monkeypatch.setattr(MTPDrafter, "step", recording_step)  # below the oracle, which also tracks rows
    oracle_source = generate(model, ids, mask, False, max_new_tokens=new_tokens + 4)
    install_oracle(monkeypatch, oracle_source, mask, DRAFTERS["mixed"])
    out = generate(model, ids, mask, True, max_new_tokens=new_tokens)
    assert torch.equal(out, oracle_source[:, : ids.shape[1] + new_tokens])
    assert 0 < model.last_speculative_stats["acceptance_rate"] < 1

    normed = []
    hooks = [
        layer.shared_head.norm.register_forward_hook(lambda m, a, o: normed.append(o))
        for layer in model.model.mtp_layers
    ]
    for row, newest, drafts, logits in records:
        committed = out[row][torch.cat([mask[row].bool(), torch.ones(new_tokens, dtype=torch.bool)])][: newest + 2]
        sequence = torch.cat([committed, committed.new_tensor(drafts[:-1])])[None]
        normed.clear()
        with torch.no_grad():
            model(sequence, labels=sequence)  # the training path runs every MTP depth over the whole sequence
        expected = torch.stack([model.lm_head(n[0, newest]) for n in normed])  # depth i at P predicts P+1+i
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert drafts == expected.argmax(-1).tolist()
    for hook in hooks:
        hook.remove()
    assert len(records) > 8


def test_acceptance_rule_in_closed_form():
    """Draft x ~ q, kept with probability min(1, p(x)/q(x)), else resampled from normalize(max(p - q, 0)): the
    committed token is distributed exactly as p, for any p and q (q with zeros, p == q included)."""
    generator = torch.Generator().manual_seed(0)
    vocab = 7
    p = torch.rand(5, vocab, generator=generator, dtype=torch.float64)
    q = torch.rand(5, vocab, generator=generator, dtype=torch.float64)
    q[0, :3] = 0.0  # a drafter that never proposes some tokens
    p[1, 4:] = 0.0  # a target that excludes some (top-k): their drafts are always rejected
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    q[2] = p[2]  # identical distributions: every draft kept
    outcome = torch.zeros_like(p)
    residual = residual_distribution(p, q)
    for x in range(vocab):
        draft = torch.full((5,), x)
        keep = torch.where(q[:, x] > 0, acceptance_probability(p, q, draft), 0.0)
        outcome += q[:, x : x + 1] * (
            keep[:, None] * torch.nn.functional.one_hot(draft, vocab) + (1 - keep)[:, None] * residual
        )
    torch.testing.assert_close(outcome, p, rtol=0, atol=1e-12)
    assert torch.all(acceptance_probability(p[2:3], q[2:3], torch.arange(1)) == 1.0)


def first_tokens_distribution(model, prompt, warpers, vocab: int) -> torch.Tensor:
    """The exact joint distribution [V, V, V] of the first three sampled tokens, from full forwards."""

    def probs(logits):
        return warpers(None, logits.double()).softmax(-1)

    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # [V*V, 2]
    with torch.no_grad():
        first = probs(model(prompt).logits[:, -1])[0]  # [V]
        logits = model(torch.cat([prompt.expand(len(pairs), -1), pairs], dim=1)).logits
    second = probs(logits[:, -2]).view(vocab, vocab, vocab)[:, 0]  # p(t2 | t1), the same for every t2 in the pair
    third = probs(logits[:, -1]).view(vocab, vocab, vocab)  # p(t3 | t1, t2)
    return first[:, None, None] * second[:, :, None] * third


def chi_square_excess(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic in standard deviations above its mean (cells expecting < 5 pooled)."""
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    statistic = ((counts - expected) ** 2 / expected.clamp(min=1e-9)).sum().item()
    dof = len(counts) - 1
    return (statistic - dof) / (2 * dof) ** 0.5


@pytest.mark.parametrize("depths", [1, 2], ids=["1 draft", "2 drafts"])
def test_sampling_keeps_the_distribution_of_plain_sampling(monkeypatch, depths):
    """4,000 rows of one prompt, sampled speculatively (temperature and top-k on both p and q): the joint
    distribution of the first three tokens (the second and third from the first verified drafts) matches the exact
    one; resampling rejections from p does not."""
    vocab, rows = 8, 4000
    model = random_model(2, vocab_size=vocab, initializer_range=0.5, num_nextn_predict_layers=depths)
    prompt = torch.tensor([[3, 5, 1, 6, 2]])
    config = GenerationConfig(
        do_sample=True, temperature=0.8, top_k=5, max_new_tokens=3, eos_token_id=[], pad_token_id=0
    )
    exact = first_tokens_distribution(model, prompt, lambda ids, s: TopKLogitsWarper(5)(ids, s / 0.8), vocab)

    def sample() -> torch.Tensor:
        torch.manual_seed(0)
        out = model.generate(prompt.expand(rows, -1), generation_config=config, mtp_speculative=True)
        tokens = out[:, -3:]
        return torch.bincount(tokens[:, 0] * vocab * vocab + tokens[:, 1] * vocab + tokens[:, 2], minlength=vocab**3)

    counts = sample().double()
    stats = model.last_speculative_stats
    assert 0.2 < stats["acceptance_rate"] < 0.95  # both branches of the rule ran
    assert counts[exact.flatten() == 0].sum() == 0  # nothing outside the top-k is ever committed
    assert chi_square_excess(counts, rows * exact.flatten()) < 5.0

    # a classic mistake, resampling a rejected draft from p instead of normalize(max(p - q, 0)), is caught
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    assert chi_square_excess(sample().double(), rows * exact.flatten()) > 5.0


def test_generation_config_flag_use_mtp_and_dict_output():
    model = random_model(4)
    ids, mask = left_padded_batch([5, 3], seed=4)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=[])
    config.mtp_speculative = True
    out = model.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)
    assert torch.equal(out.sequences, generate(model, ids, mask, False, max_new_tokens=6))
    assert set(model.last_speculative_stats) == STATS_KEYS
    model.last_speculative_stats = None
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=PAD, eos_token_id=[], use_mtp=True)
    assert torch.equal(out, generate(model, ids, mask, False, max_new_tokens=6))
    assert model.last_speculative_stats is not None  # transformers' own flag runs this model's drafter


def test_fewer_drafts_than_mtp_modules():
    model = random_model(4, num_nextn_predict_layers=2)
    ids, mask = left_padded_batch([5, 3], seed=4)
    out = generate(model, ids, mask, True, mtp_draft_tokens=1, max_new_tokens=8)
    assert torch.equal(out, generate(model, ids, mask, False, max_new_tokens=8))
    stats = model.last_speculative_stats
    assert stats["draft_tokens"] == 2 * (stats["steps"] - 1)  # one draft per row per verifying pass
    with pytest.raises(ValueError, match="1 to 2 tokens"):
        generate(model, ids, mask, True, mtp_draft_tokens=3)


def test_clear_errors():
    model = random_model(0)
    ids, mask = left_padded_batch([5, 3], seed=0)
    no_mtp = DeepSeekForCausalLM(tiny_config(num_nextn_predict_layers=0)).eval()
    with pytest.raises(ValueError, match="no MTP|has none"):
        no_mtp.generate(ids, attention_mask=mask, max_new_tokens=4, mtp_speculative=True)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=4, mtp_speculative=True)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(ids, attention_mask=mask, repetition_penalty=1.3, max_new_tokens=4, mtp_speculative=True)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(ids, attention_mask=mask, streamer=object(), max_new_tokens=4, mtp_speculative=True)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask.flip(1), max_new_tokens=4, mtp_speculative=True)
    with pytest.raises(ValueError, match="one sequence"):
        next(mtp_speculative_stream(model, ids, 4))


@pytest.mark.gpu
def test_on_cuda_a_left_padded_batch_equals_plain_greedy_generate():
    """The same comparison on the GPU's kernels (fp32, so that no near-tie can flip a token), against plain greedy
    decoding over transformers' dynamic cache, the eager kernels speculative decoding also runs."""
    model = random_model(0).cuda()
    ids, mask = (t.cuda() for t in left_padded_batch(PROMPT_LENGTHS, seed=1))
    free = generate(model, ids, mask, False, cache_implementation="dynamic")
    eos = free[0, ids.shape[1] + 4].item()
    reference = generate(model, ids, mask, False, eos_token_id=eos, cache_implementation="dynamic")
    assert torch.equal(generate(model, ids, mask, True, eos_token_id=eos), reference)


@pytest.mark.gpu
def test_on_cuda_the_trained_checkpoint_accepts_most_drafts():
    """The embedded checkpoint (one MTP layer) on held-out sums, batch 8: same tokens as plain greedy, and most
    drafts accepted (85-90% in DeepSeek-V3; the CPU benchmark measures ~98% on these sums)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from hf_deepseek.evals.task_data import load_rows, prompt_text

    checkpoint = Path(__file__).parents[1] / "checkpoints" / "hf-deepseek-r1-tiny"
    if not (checkpoint / "config.json").is_file():
        pytest.skip("the embedded checkpoint is not shipped in this tree")
    model = DeepSeekForCausalLM.from_pretrained(checkpoint).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(row)}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for row in load_rows("addition")["test"][:8]
    ]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts]).cuda()
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).cuda()
    kwargs = dict(max_new_tokens=160, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    reference = generate(model, ids, mask, False, cache_implementation="dynamic", **kwargs)
    assert torch.equal(generate(model, ids, mask, True, **kwargs), reference)
    assert model.last_speculative_stats["acceptance_rate"] > 0.8
