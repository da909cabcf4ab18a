"""transformers' generation modes on our model give the tokens they give on transformers' DeepseekV3 with the same
weights: greedy, seeded sampling, beam search with and without a cache (`return_dict_in_generate=True`), assisted
decoding with a draft model, prompt lookup, and the static cache with the compiled decode step."""

import pytest
import torch
from conformance_helpers import PROMPT, generate_both, reference_pair
from transformers.generation.configuration_utils import CompileConfig

from hf_deepseek import DeepSeekForCausalLM

NEW = dict(max_new_tokens=8, min_new_tokens=8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return reference_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """A smaller draft model for each side (one layer less, same vocabulary), on the same weights."""
    return reference_pair(tmp_path_factory.mktemp("draft"), config="plain-q", num_hidden_layers=2)


def test_greedy(pair):
    ours, ref = generate_both(*pair, do_sample=False, **NEW)
    assert torch.equal(ours, ref)


def test_seeded_sampling(pair):
    ours, ref = generate_both(*pair, seed=7, do_sample=True, top_k=20, temperature=0.8, **NEW)
    assert torch.equal(ours, ref)
    again, _ = generate_both(*pair, seed=8, do_sample=True, top_k=20, temperature=0.8, **NEW)
    assert not torch.equal(ours, again)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search(pair, use_cache):
    ours, ref = generate_both(
        *pair, num_beams=3, do_sample=False, use_cache=use_cache, return_dict_in_generate=True, output_scores=True,
        **NEW,
    )  # fmt: skip
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)


def test_assisted_decoding_with_a_draft_model(pair, drafts):
    ours, ref = pair
    our_draft, ref_draft = drafts
    greedy = dict(do_sample=False, pad_token_id=2, **NEW)
    assisted = ours.generate(PROMPT[:1], assistant_model=our_draft, **greedy)
    assert torch.equal(assisted, ref.generate(PROMPT[:1], assistant_model=ref_draft, **greedy))
    plain = ours.generate(PROMPT[:1], **greedy)
    assert torch.equal(assisted, plain)  # greedy assisted decoding changes the speed, never the tokens
    # our main model with transformers' draft, and the other way round
    assert torch.equal(ours.generate(PROMPT[:1], assistant_model=ref_draft, **greedy), plain)
    assert torch.equal(ref.generate(PROMPT[:1], assistant_model=our_draft, **greedy), plain)


def test_prompt_lookup_decoding(pair):
    repeating = torch.cat([PROMPT[:1, :5], PROMPT[:1, :5], PROMPT[:1, :3]], dim=1)
    outputs = [m.generate(repeating, prompt_lookup_num_tokens=3, do_sample=False, pad_token_id=2, **NEW) for m in pair]
    assert torch.equal(*outputs)
    assert torch.equal(outputs[0], pair[0].generate(repeating, do_sample=False, pad_token_id=2, **NEW))


def test_static_cache_with_compiled_decode_step(pair):
    """`cache_implementation="static"` with a compile config: transformers compiles the decode step (fullgraph, so a
    graph break raises); the eager backend runs Dynamo's graph, as Inductor takes minutes on a CI core."""
    ours, ref = pair

    def compile_config() -> CompileConfig:
        config = CompileConfig(fullgraph=True, backend="eager")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        return config

    outputs = []
    for model in pair:
        outputs.append(
            model.generate(
                PROMPT,
                do_sample=False,
                pad_token_id=2,
                cache_implementation="static",
                compile_config=compile_config(),
                **NEW,
            )  # fmt: skip
        )
        assert model._compiled_call is not None  # the compiled step did run
    assert torch.equal(*outputs)
    assert DeepSeekForCausalLM._can_compile_fullgraph
    torch._dynamo.reset()
