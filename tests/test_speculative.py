"""MTP self-speculative decoding: the output equals plain greedy `generate` whatever the drafts, the drafts are
the MTP module's own predictions (as in training), and acceptance is counted."""

import pytest
import torch
from app_helpers import FINITE_SCRIPT, scripted_chat_model
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling import speculative
from hf_deepseek.modeling.speculative import DraftStats, mtp_greedy_generate, mtp_speculative_stream

PROMPT_LEN, NEW = 7, 32


def greedy_reference(model, prompt, max_new_tokens, eos_token_id=None) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )


def random_model_and_prompt(seed: int, **overrides):
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(tiny_config(initializer_range=0.1, **overrides)).eval()
    return model, torch.randint(4, 97, (1, PROMPT_LEN))


@pytest.mark.parametrize("seed", range(4))
def test_output_equals_plain_greedy_generation(seed):
    model, prompt = random_model_and_prompt(seed)
    out, stats = mtp_greedy_generate(model, prompt, NEW, eos_token_id=[])
    assert torch.equal(out, greedy_reference(model, prompt, NEW))
    assert stats.drafted + 1 == stats.main_passes  # one prefill, then one verify pass per draft
    assert 1 + stats.drafted + stats.accepted == NEW  # each pass commits one token, two when its draft is right


def test_equals_greedy_when_drafts_are_accepted_and_rejected_in_turn(monkeypatch):
    """Force a mix: an oracle drafts the right token on two calls of three, a wrong one on the third."""
    model, prompt = random_model_and_prompt(7)
    reference = greedy_reference(model, prompt, NEW)[0].tolist()
    calls = []

    def oracle_draft(self, hidden, next_ids, start):
        target = reference[start + next_ids.shape[1] + 1]  # the token after the newest committed one
        calls.append(target)
        return target if len(calls) % 3 else (target + 1) % model.config.vocab_size

    monkeypatch.setattr(speculative._MTPDrafter, "draft", oracle_draft)
    out, stats = mtp_greedy_generate(model, prompt, NEW, eos_token_id=[])
    assert out[0].tolist() == reference
    assert 0 < stats.accepted < stats.drafted
    assert stats.main_passes < NEW  # accepted drafts saved main-model passes


def test_drafts_are_the_mtp_modules_predictions_on_the_full_sequence(monkeypatch):
    """The incremental drafter (own latent cache) predicts what the MTP module predicts in a training forward."""
    model, prompt = random_model_and_prompt(3)
    drafts = {}
    original = speculative._MTPDrafter.draft

    def recording_draft(self, hidden, next_ids, start):
        drafts[start + next_ids.shape[1] + 1] = original(self, hidden, next_ids, start)
        return drafts[start + next_ids.shape[1] + 1]

    monkeypatch.setattr(speculative._MTPDrafter, "draft", recording_draft)
    out, _ = mtp_greedy_generate(model, prompt, NEW, eos_token_id=[])

    seen = []
    handle = model.model.mtp_layers[0].shared_head.norm.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(out, labels=out)  # the training path runs the MTP module over the whole sequence
    handle.remove()
    full = model.lm_head(seen[0]).argmax(-1)[0]  # position t predicts token t + 2
    assert drafts and all(full[target - 2].item() == draft for target, draft in drafts.items())


def test_stops_at_eos_and_at_max_new_tokens():
    model, prompt = random_model_and_prompt(1)
    free = greedy_reference(model, prompt, NEW)[0, PROMPT_LEN:].tolist()
    eos = free[5]  # a token the model does produce: generation must stop right after it
    out, _ = mtp_greedy_generate(model, prompt, NEW, eos_token_id=eos)
    assert torch.equal(out, greedy_reference(model, prompt, NEW, eos_token_id=eos))
    assert out[0, -1].item() == eos
    for limit in (1, 2, 5):
        out, _ = mtp_greedy_generate(model, prompt, limit, eos_token_id=[])
        assert out[0, PROMPT_LEN:].tolist() == free[:limit]


def test_a_perfect_drafter_is_always_accepted_and_halves_the_passes():
    model = scripted_chat_model(FINITE_SCRIPT)  # its MTP module is set to predict the script one token further
    prompt = torch.tensor([[1, 5, 20, 2, 6]])  # ... <|assistant|>
    stats = DraftStats()
    chunks = list(mtp_speculative_stream(model, prompt, 64, eos_token_id=2, stats=stats))
    tokens = [t for chunk in chunks for t in chunk]
    assert tokens == greedy_reference(model, prompt, 64, eos_token_id=2)[0, 5:].tolist()
    assert stats.acceptance_rate == 1.0 and len(tokens) == 11 and stats.main_passes == 6


def test_rejects_batches_and_models_without_mtp():
    model, prompt = random_model_and_prompt(0)
    with pytest.raises(ValueError, match="one sequence"):
        next(mtp_speculative_stream(model, prompt.repeat(2, 1), 4))
    no_mtp = DeepSeekForCausalLM(tiny_config(num_nextn_predict_layers=0)).eval()
    with pytest.raises(ValueError, match="no MTP module"):
        next(mtp_speculative_stream(no_mtp, prompt, 4))
