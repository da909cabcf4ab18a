"""DeepSeekConfig: errors that name the field, RoPE conversion, round trips, the official config.json."""

import json
import math

import pytest
from conftest import TINY_CONFIG_DEFAULTS, tiny_config

from hf_deepseek import DeepSeekConfig
from hf_deepseek.configuration import AUTO_MAP
from hf_deepseek.modeling.attention import RotaryEmbedding, yarn_softmax_scale

# (overrides on the tiny config, the field the error must name)
INVALID = [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # more than n_routed_experts=8
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"n_routed_experts": 9, "num_experts_per_tok": 2}, "n_routed_experts"),  # 9 % n_group=2
    ({"n_group": 2, "topk_group": 3}, "topk_group"),  # topk_group > n_group
    ({"topk_group": 0}, "topk_group"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "topk_group"),  # 1 kept group of 2 < 3
    ({"n_group": 0}, "n_group"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"kv_lora_rank": -4}, "kv_lora_rank"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"q_lora_rank": -1}, "q_lora_rank"),
    ({"qk_rope_head_dim": 0}, "qk_rope_head_dim"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),  # odd: RoPE rotates pairs
    ({"qk_nope_head_dim": 0}, "qk_nope_head_dim"),
    ({"v_head_dim": 0}, "v_head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"n_routed_experts": 0}, "n_routed_experts"),
    ({"moe_layer_freq": 0}, "moe_layer_freq"),
    ({"scoring_func": "softplus"}, "scoring_func"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),  # MLA: one latent shared by all heads
    ({"mtp_loss_weight": -0.1}, "mtp_loss_weight"),
    ({"aux_loss_alpha": -1e-4}, "aux_loss_alpha"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
]


@pytest.mark.parametrize(("overrides", "field"), INVALID, ids=[f"{f}={o[f]}" for o, f in INVALID])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"DeepSeekConfig\.{field}="):
        tiny_config(**overrides)


def test_tiny_defaults_are_valid():
    cfg = tiny_config()
    for key, value in TINY_CONFIG_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    assert cfg.qk_head_dim == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == [False, True, True]


def test_q_lora_rank_none_is_accepted():
    cfg = tiny_config(q_lora_rank=None)
    assert cfg.q_lora_rank is None


def test_dense_model_ignores_routing_fields():
    # every layer dense: the routing fields are unused, so inconsistent values are not an error
    cfg = tiny_config(first_k_dense_replace=3, num_experts_per_tok=99)
    assert not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def test_softmax_scoring_is_accepted():
    assert tiny_config(scoring_func="softmax").scoring_func == "softmax"


def test_legacy_rope_scaling_becomes_rope_parameters():
    legacy = {
        "type": "yarn",
        "factor": 40,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    }
    cfg = tiny_config(rope_scaling=legacy, rope_theta=10000, max_position_embeddings=163840)
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "yarn"
    assert rope["rope_theta"] == 10000
    assert rope["factor"] == 40
    assert rope["mscale_all_dim"] == 1.0
    assert rope["original_max_position_embeddings"] == 4096
    # mscale == mscale_all_dim: YaRN's cos/sin scaling cancels, the softmax scale carries mscale^2 instead
    assert RotaryEmbedding(cfg).attention_scaling == pytest.approx(1.0)
    expected = cfg.qk_head_dim**-0.5 * (0.1 * math.log(40) + 1.0) ** 2
    assert yarn_softmax_scale(cfg) == pytest.approx(expected)


def test_v5_rope_parameters_accepted():
    rope = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = tiny_config(rope_parameters=dict(rope))
    for key, value in rope.items():
        assert cfg.rope_parameters[key] == value
    assert RotaryEmbedding(cfg).inv_freq.shape == (cfg.qk_rope_head_dim // 2,)


def test_default_rope_without_scaling():
    cfg = tiny_config()
    assert cfg.rope_parameters["rope_type"] == "default"
    assert yarn_softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5)


def test_save_load_round_trip_keeps_every_field(tmp_path):
    cfg = tiny_config(
        q_lora_rank=None,
        mtp_loss_weight=0.7,
        aux_loss_alpha=1e-3,
        num_nextn_predict_layers=2,
        scoring_func="softmax",
        routed_scaling_factor=1.5,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 5e4,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    cfg.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "hf_deepseek"
    assert on_disk["auto_map"] == AUTO_MAP  # names hf_deepseek_auto.py, written beside it (plain loading)
    assert (tmp_path / "hf_deepseek_auto.py").is_file()
    loaded = DeepSeekConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()
    for key in TINY_CONFIG_DEFAULTS:
        assert getattr(loaded, key) == getattr(cfg, key), key
    assert loaded.q_lora_rank is None
    assert loaded.mtp_loss_weight == 0.7
    assert loaded.aux_loss_alpha == 1e-3
    assert loaded.auto_map == AUTO_MAP


# config.json of deepseek-ai/DeepSeek-V3, as published
OFFICIAL_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_official_deepseek_v3_config_loads_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_DEEPSEEK_V3))
    cfg = DeepSeekConfig.from_pretrained(tmp_path)

    assert isinstance(cfg, DeepSeekConfig)
    assert cfg.model_type == "hf_deepseek"
    for key in (
        "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
        "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace", "q_lora_rank",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size",
        "max_position_embeddings", "routed_scaling_factor", "scoring_func", "norm_topk_prob",
        "num_nextn_predict_layers", "moe_layer_freq", "rms_norm_eps", "aux_loss_alpha", "bos_token_id",
        "eos_token_id", "tie_word_embeddings",
    ):  # fmt: skip
        assert getattr(cfg, key) == OFFICIAL_DEEPSEEK_V3[key], key
    assert cfg.qk_head_dim == 192
    # DeepSeek's remote code (not shipped with a saved checkpoint) is replaced by this package's own module
    assert cfg.auto_map == AUTO_MAP
    # unknown official keys are kept as attributes
    assert cfg.quantization_config == OFFICIAL_DEEPSEEK_V3["quantization_config"]
    assert cfg.topk_method == "noaux_tc"
    assert cfg.ep_size == 1
    # legacy rope_scaling + rope_theta -> rope_parameters
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "yarn"
    assert rope["rope_theta"] == 10000
    for key in (
        "factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "original_max_position_embeddings",
    ):
        assert rope[key] == OFFICIAL_DEEPSEEK_V3["rope_scaling"][key], key
    assert yarn_softmax_scale(cfg) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert RotaryEmbedding(cfg).attention_scaling == pytest.approx(1.0)


def test_official_config_survives_a_save_load_round_trip(tmp_path):
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "config.json").write_text(json.dumps(OFFICIAL_DEEPSEEK_V3))
    cfg = DeepSeekConfig.from_pretrained(tmp_path / "official")
    cfg.save_pretrained(tmp_path / "saved")
    again = DeepSeekConfig.from_pretrained(tmp_path / "saved")
    assert again.to_dict() == cfg.to_dict()
    assert again.auto_map == AUTO_MAP
    assert again.quantization_config == OFFICIAL_DEEPSEEK_V3["quantization_config"]
    assert yarn_softmax_scale(again) == pytest.approx(yarn_softmax_scale(cfg))
