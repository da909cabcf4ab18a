"""`forward` as transformers users call it, against transformers' DeepseekV3 on the same weights: attention weights,
tuple outputs, the config's output flags, no cache entry without a cache, `shift_labels`, every RoPE type
transformers' initialisers know, and tracing (`torch.export`, `torch.compile(fullgraph=True)` of a decode step)."""

import pytest
import torch
from conformance_helpers import PROMPT, reference_pair
from test_parity import decode_logits

from hf_deepseek.modeling.latent_cache import LatentStaticCache
from hf_deepseek.modeling.pretrained import CACHE_FIELD


@pytest.fixture(scope="module")
def eager_pair(tmp_path_factory):
    return reference_pair(tmp_path_factory.mktemp("eager"), attn="eager")


@torch.no_grad()
def test_output_attentions_returns_transformers_attention_weights(eager_pair):
    ours, ref = eager_pair
    mine, theirs = ours(PROMPT, output_attentions=True), ref(PROMPT, output_attentions=True)
    assert len(mine.attentions) == len(theirs.attentions) == ours.config.num_hidden_layers
    for a, b in zip(mine.attentions, theirs.attentions, strict=True):
        assert a.shape == (2, 4, 10, 10)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # cached decoding (the absorbed path) returns the weights over the whole cache
    cache = ours(PROMPT[:, :6]).cache
    step = ours(PROMPT[:, 6:7], cache=cache, output_attentions=True)
    assert [tuple(a.shape) for a in step.attentions] == [(2, 4, 1, 7)] * ours.config.num_hidden_layers
    full = ours(PROMPT[:, :7], output_attentions=True, use_cache=False)
    torch.testing.assert_close(step.attentions[0][:, :, 0], full.attentions[0][:, :, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_output_attentions_under_sdpa_falls_back_to_eager_weights(tmp_path, eager_pair):
    ours_sdpa, _ = reference_pair(tmp_path)
    assert ours_sdpa.config._attn_implementation == "sdpa"
    expected = eager_pair[0](PROMPT, output_attentions=True).attentions
    for a, b in zip(ours_sdpa(PROMPT, output_attentions=True).attentions, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_return_dict_false_and_config_flags_match_transformers(eager_pair):
    ours, ref = eager_pair
    mine, theirs = ours(PROMPT, return_dict=False), ref(PROMPT, return_dict=False)
    assert isinstance(mine, tuple) and isinstance(theirs, tuple) and len(mine) == len(theirs) == 2
    torch.testing.assert_close(mine[0], theirs[0], atol=1e-4, rtol=0)
    assert type(mine[1]) is type(theirs[1])  # the cache
    assert isinstance(ours.model(PROMPT, return_dict=False), tuple)
    try:
        for model in (ours, ref):
            model.config.output_hidden_states = model.config.output_attentions = True
        mine, theirs = ours(PROMPT), ref(PROMPT)
        assert set(mine.keys()) == set(theirs.keys()) == {"logits", CACHE_FIELD, "hidden_states", "attentions"}
        assert len(mine.hidden_states) == len(theirs.hidden_states) == ours.config.num_hidden_layers + 1
        for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        # transformers' own DeepseekV3ForCausalLM breaks here (its backbone returns a tuple to the head), so ours alone
        ours.config.return_dict = False
        assert ours.config.use_return_dict is False
        as_tuple = ours(PROMPT)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 4  # logits, cache, hidden states, attentions
        torch.testing.assert_close(as_tuple[0], theirs.logits, atol=1e-4, rtol=0)
    finally:
        for model in (ours, ref):
            model.config.output_hidden_states = model.config.output_attentions = False
        ours.config.return_dict = True


@torch.no_grad()
def test_use_cache_false_output_has_no_cache_entry(eager_pair):
    ours, ref = eager_pair
    assert list(ours(PROMPT, use_cache=False).keys()) == list(ref(PROMPT, use_cache=False).keys()) == ["logits"]
    assert list(ours.model(PROMPT, use_cache=False).keys()) == ["last_hidden_state"]


def test_shift_labels_gives_transformers_loss(tmp_path):
    """transformers' loss takes `shift_labels` (already shifted: position t's target); its DeepseekV3 computes a
    loss only when `labels` is also passed, ours from `shift_labels` alone."""
    ours, ref = reference_pair(tmp_path)
    labels = PROMPT.clone()
    labels[:, :3] = -100
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shifted[:, -1] = 5  # a target only shift_labels can carry: the token after the last position
    without_mtp = type(ours).from_pretrained(tmp_path, num_nextn_predict_layers=0).eval()
    with torch.no_grad():
        expected = ref(PROMPT, labels=labels, shift_labels=shifted).loss
        torch.testing.assert_close(without_mtp(PROMPT, shift_labels=shifted).loss, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(without_mtp(PROMPT, labels=labels, shift_labels=shifted).loss, expected)
        assert not torch.allclose(without_mtp(PROMPT, labels=labels).loss, expected)  # the extra target counts
        # with the MTP module, shift_labels feed its loss as the equivalent labels do
        assert ours(PROMPT, shift_labels=shifted).mtp_loss is not None
        torch.testing.assert_close(ours(PROMPT, shift_labels=shifted).mtp_loss, ours(PROMPT, labels=labels).mtp_loss)


ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32,
             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.2, 1.8, 2.9, 4.4],
                 "original_max_position_embeddings": 8},
}  # fmt: skip


@pytest.mark.parametrize("rope_type", list(ROPE))
def test_rope_type_dispatches_like_transformers(rope_type, tmp_path):
    """Prompts within and decoding beyond `max_position_embeddings` (16): dynamic NTK re-derives its frequencies
    there and longrope switches to its long factors past `original_max_position_embeddings`."""
    rope = {"rope_theta": 10000.0, **ROPE[rope_type]}
    ours, ref = reference_pair(tmp_path, rope_parameters=rope, max_position_embeddings=16)
    assert ours.model.rotary_emb.rope_type == rope_type
    ids = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:, :6]).logits, ref(ids[:, :6]).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(ids[:, :16]).logits, ref(ids[:, :16]).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(decode_logits(ours, ids, 6), decode_logits(ref, ids, 6), atol=1e-4, rtol=0)
    default = reference_pair(tmp_path / "default", rope_parameters={"rope_type": "default", "rope_theta": 1e4})[0]
    with torch.no_grad():
        assert not torch.allclose(default(ids[:, :16]).logits, ours(ids[:, :16]).logits, atol=1e-3)


@torch.no_grad()
def test_torch_export_of_the_model_matches_eager(eager_pair):
    ours = eager_pair[0]
    ids = PROMPT[:, :8]
    exported = torch.export.export(ours, (ids,), kwargs={"use_cache": False})
    other = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(exported.module()(other, use_cache=False).logits, ours(other, use_cache=False).logits)


@torch.no_grad()
def test_compiled_fullgraph_decode_step_matches_eager(tmp_path):
    """One decode step over the static latent cache, compiled whole (a graph break would raise); Dynamo's graph
    run by the eager backend, as Inductor's code generation takes minutes on a CI core."""
    ours, ref = reference_pair(tmp_path)
    cache = LatentStaticCache(ours.config, max_cache_len=16)
    ours(PROMPT[:, :8], cache=cache)
    step = torch.compile(ours, fullgraph=True, backend="eager")
    compiled = step(PROMPT[:, 8:9], cache=cache, position_ids=torch.full((2, 1), 8)).logits
    expected = ref(PROMPT[:, :9]).logits[:, -1:]
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=0)
    torch._dynamo.reset()
