"""Random configs (hypothesis) and hostile inputs: invalid configs raise ValueError naming the field before any tensor
exists, valid ones build and run; empty, over-long and out-of-vocabulary prompts, bad sampling parameters, odd text
and hostile reward inputs get clear errors or are handled in bounded time."""

import time
from unittest import mock

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.data import build_tokenizer
from hf_deepseek.trainers.rewards import accuracy_reward, countdown_reward

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------ configs

valid_configs = st.fixed_dictionaries(
    {
        "hidden_size": st.sampled_from([16, 32, 48]),
        "num_hidden_layers": st.integers(1, 3),
        "first_k_dense_replace": st.integers(0, 2),
        "num_attention_heads": st.integers(1, 4),
        "kv_lora_rank": st.integers(4, 24),
        "q_lora_rank": st.one_of(st.none(), st.integers(4, 24)),
        "qk_nope_head_dim": st.integers(2, 12),
        "qk_rope_head_dim": st.sampled_from([2, 4, 8]),
        "v_head_dim": st.integers(2, 12),
        "n_group": st.sampled_from([1, 2]),
        "experts_per_group": st.integers(1, 4),
        "n_shared_experts": st.integers(0, 2),
        "num_nextn_predict_layers": st.integers(0, 2),
        "scoring_func": st.sampled_from(["sigmoid", "softmax"]),
    }
)


def build(draw: dict) -> dict:
    draw = dict(draw)
    n_routed = draw["n_group"] * draw.pop("experts_per_group")
    return {
        **draw,
        "vocab_size": 37,
        "intermediate_size": 24,
        "moe_intermediate_size": 8,
        "n_routed_experts": n_routed,
        "topk_group": draw["n_group"],
        "num_experts_per_tok": min(2, n_routed),
        "max_position_embeddings": 32,
    }


@FAST
@given(valid_configs)
def test_every_valid_config_builds_and_runs_a_forward_pass(draw):
    config = DeepSeekConfig(**build(draw))
    model = DeepSeekForCausalLM(config)
    ids = torch.randint(0, 37, (2, 5))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 5, 37) and torch.isfinite(out.loss)
    assert (out.mtp_loss is not None) == (config.num_nextn_predict_layers > 0)


INVALID_VALUES = {
    "vocab_size": st.integers(-5, 0),
    "hidden_size": st.integers(-5, 0),
    "num_hidden_layers": st.integers(-3, 0),
    "num_attention_heads": st.integers(-3, 0),
    "kv_lora_rank": st.integers(-3, 0),
    "q_lora_rank": st.integers(-3, 0),
    "qk_rope_head_dim": st.sampled_from([0, 3, 5, -2]),
    "max_position_embeddings": st.integers(-3, 0),
    "n_shared_experts": st.integers(-3, -1),
    "num_nextn_predict_layers": st.integers(-3, -1),
    "rms_norm_eps": st.floats(-1.0, 0.0),
    "mtp_loss_weight": st.floats(-10.0, -1e-6),
    "aux_loss_alpha": st.floats(-10.0, -1e-6),
    "attention_dropout": st.one_of(st.floats(1.0, 5.0), st.floats(-5.0, -1e-6)),
    "num_key_value_heads": st.integers(1, 3),  # tiny config has 4 heads: MLA needs equal counts
    "n_routed_experts": st.sampled_from([0, -1, 7]),  # 7: not divisible by n_group=2
    "num_experts_per_tok": st.sampled_from([0, 9, 100]),
    "n_group": st.sampled_from([0, -2, 3]),  # 3: 8 experts not divisible
    "topk_group": st.sampled_from([0, 3]),
    "scoring_func": st.text(min_size=1, max_size=8).filter(lambda s: s not in ("sigmoid", "softmax")),
    "routed_scaling_factor": st.floats(-5.0, 0.0),
    "moe_intermediate_size": st.integers(-3, 0),
}


@settings(max_examples=60, deadline=None)
@given(field_value=st.sampled_from(sorted(INVALID_VALUES)).flatmap(lambda f: st.tuples(st.just(f), INVALID_VALUES[f])))
def test_every_invalid_field_raises_naming_it_before_any_tensor_is_allocated(field_value):
    field, value = field_value
    allocated = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        allocated.append(args)
        return real_empty(*args, **kwargs)

    with mock.patch.object(torch, "empty", counting_empty), pytest.raises(ValueError) as err:
        DeepSeekForCausalLM(tiny_config(**{field: value}))
    message = str(err.value)
    named = {"num_experts_per_tok": ("num_experts_per_tok", "topk_group"), "n_group": ("n_group", "n_routed_experts")}
    assert any(f"DeepSeekConfig.{name}=" in message for name in named.get(field, (field,))), message
    assert "is invalid:" in message and allocated == []


@pytest.mark.parametrize(("field", "value"), [("hidden_size", 1.5), ("num_hidden_layers", "3"), ("scoring_func", 1)])
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(field, value):
    with pytest.raises(Exception) as err:  # huggingface_hub's strict dataclass validation error
        tiny_config(**{field: value})
    assert f"Validation error for field '{field}'" in str(err.value) and "expected" in str(err.value)


# ------------------------------------------------------------------------------ generation inputs


@pytest.fixture(scope="module")
def small():
    tok = build_tokenizer()
    config = tiny_config(vocab_size=len(tok), max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    return DeepSeekForCausalLM(config).eval(), tok


def test_empty_prompt_gets_a_clear_error(small):
    model, _ = small
    with pytest.raises(ValueError, match=r"The input has no tokens \(shape \[1, 0\]\); pass at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_prompt_beyond_max_position_embeddings_is_refused(small):
    model, _ = small
    with pytest.raises(ValueError) as err:
        model.generate(torch.ones(1, 65, dtype=torch.long), max_new_tokens=2)
    assert str(err.value) == (
        "The prompt has 65 tokens but the model's context is max_position_embeddings=64; shorten or truncate the "
        "prompt (tokenizer(..., truncation=True, max_length=64))."
    )
    assert model.generate(torch.ones(1, 64, dtype=torch.long), max_new_tokens=1).shape == (1, 65)  # at the limit


def test_packed_rows_longer_than_the_context_are_fine_when_positions_restart(small):
    model, _ = small
    ids = torch.ones(1, 100, dtype=torch.long)
    positions = torch.arange(50).repeat(2)[None]
    assert model(input_ids=ids, position_ids=positions).logits.shape == (1, 100, model.config.vocab_size)


@pytest.mark.parametrize("bad", [-1, 10_000])
def test_token_ids_outside_the_vocabulary_are_named(small, bad):
    model, tok = small
    with pytest.raises(ValueError, match=f"Token id {bad} in input_ids is outside the vocabulary \\[0, {len(tok)}\\)"):
        model(input_ids=torch.tensor([[3, bad]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(do_sample=True, temperature=-1.0), "`temperature` (=-1.0) has to be a strictly positive float"),
        (dict(do_sample=True, top_k=-3), "`top_k` has to be a strictly positive integer"),
        (dict(max_new_tokens=-1), "`max_new_tokens` must be greater than 0"),
    ],
)
def test_invalid_sampling_parameters_are_refused(small, kwargs, message):
    model, _ = small
    with pytest.raises(ValueError) as err:
        model.generate(torch.ones(1, 4, dtype=torch.long), **{"max_new_tokens": 2, **kwargs})
    assert message in str(err.value)


def test_control_characters_and_undecodable_bytes_are_tokenized_and_generate(small):
    model, tok = small
    text = "12+\x00\x1b[31m3\u202e=" + b"\xff\xfe\xc3".decode("utf-8", errors="replace")
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] == len(text) and (ids == tok.unk_token_id).any()  # unknown characters map to <unk>
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, ids.shape[1] + 2)


# ------------------------------------------------------------------------------ rewards


def test_reward_never_evaluates_model_text(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"open('{marker}', 'w').write('x')",
        "().__class__.__base__.__subclasses__()",
    ]
    completions = [f"<think>x</think><answer>{p}</answer>" for p in payloads]
    columns = dict(answer=["54"] * 3, task=["countdown"] * 3, numbers=[[3, 7, 25]] * 3, target=[54] * 3)
    assert accuracy_reward(None, completions, **columns) == [0.0] * 3
    assert countdown_reward(None, completions, **columns) == [0.0] * 3
    math = dict(answer=["54"] * 3, task=["math"] * 3)
    assert accuracy_reward(None, completions, **math) == [0.0] * 3
    assert not marker.exists()


@pytest.mark.parametrize(
    "answer", ["1/0", "(25-7)/(3-3)", "10**10**10", "2^2^2^2^2", "9" * 150 + "/0", "(((" * 60 + "1" + ")))" * 60]
)
def test_division_by_zero_and_exponent_bombs_score_zero_quickly(answer):
    columns = dict(answer=["54"], task=["countdown"], numbers=[[3, 7, 25]], target=[54])
    start = time.perf_counter()
    assert accuracy_reward(None, [f"<think>t</think><answer>{answer}</answer>"], **columns) == [0.0]
    assert accuracy_reward(None, [f"<answer>{answer}</answer>"], answer=["54"], task=["math"]) == [0.0]
    assert time.perf_counter() - start < 3.0
