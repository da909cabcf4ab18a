"""The DeepSeek family as users bring it: tiny random V2-Lite, V2, V3, V3.1 (FP8, ue8m0 scales) and Kimi-K2-shaped
checkpoints, with the official `config.json` of each (`model_type: deepseek_v2` / `deepseek_v3`, legacy
`rope_scaling`, DeepSeek's `auto_map`), load through `AutoModelForCausalLM` and match transformers' own
DeepseekV2ForCausalLM / DeepseekV3ForCausalLM on the same weights in fp32: max |logit difference| <= 1e-4 and the
same experts chosen for every token in every MoE layer. Each then round-trips through our own save.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity import randomize
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.modeling.fp8 import FP8InferenceLinear, FP8Recipe
from hf_deepseek.modeling.fp8_checkpoint import save_fp8_pretrained

TINY = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1, pad_token_id=2, hidden_act="silu", initializer_range=0.02, attention_bias=False,
)  # fmt: skip
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip

# Each member's routing and attention fields as its published config.json has them (sizes shrunk).
FAMILY = {
    # DeepSeek-V2-Lite: no q compression, softmax, plain greedy top-k over all experts, unnormalised gate weights
    "v2-lite": dict(
        model_type="deepseek_v2",
        q_lora_rank=None,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        aux_loss_alpha=0.001,
        seq_aux=True,
    ),
    # DeepSeek-V2 / V2.5: low-rank q, softmax, group-limited greedy (a group scores as its best expert)
    "v2": dict(
        model_type="deepseek_v2",
        q_lora_rank=24,
        n_routed_experts=16,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        first_k_dense_replace=1,
        aux_loss_alpha=0.001,
        seq_aux=True,
    ),
    # DeepSeek-V3 / R1: sigmoid, noaux_tc (group = sum of its top-2), correction bias, normalised gate weights
    "v3": dict(
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
    ),
    # Kimi-K2 (the DeepSeek-V3 architecture, its own model_type): other expert count, one group, its own scaling
    "kimi-k2": dict(
        model_type="kimi_k2",
        q_lora_rank=24,
        n_routed_experts=12,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.827,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
    ),
}
REMOTE_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                   "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}  # fmt: skip


def official_config(member: str, **extra) -> dict:
    """The config.json as DeepSeek (or Moonshot) publishes it: legacy rope keys, remote-code auto_map."""
    fields = {**TINY, **FAMILY[member], **extra}
    arch = "DeepseekV2ForCausalLM" if fields["model_type"] == "deepseek_v2" else "DeepseekV3ForCausalLM"
    return {**fields, "architectures": [arch], "auto_map": REMOTE_AUTO_MAP, "rope_theta": 10000.0,
            "rope_scaling": YARN, "torch_dtype": "bfloat16", "moe_layer_freq": 1, "ep_size": 1}  # fmt: skip


def reference_model(member: str, seed: int = 1):
    """transformers' own class for the member, built from the same official config, with O(1) random weights."""
    cfg = {k: v for k, v in official_config(member).items() if k not in ("auto_map", "architectures")}
    model_type = cfg.pop("model_type")
    if model_type == "deepseek_v2":
        ref = DeepseekV2ForCausalLM(DeepseekV2Config(**cfg))
    else:
        ref = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg))
    randomize(ref, seed)
    return ref.eval()


def save_as_published(ref, member: str, directory, **extra) -> None:
    """transformers' save of the weights, with the official config.json in place of transformers' own."""
    ref.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(official_config(member, **extra)))


def routing(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, the sorted expert indices [tokens, k] each token was sent to."""
    layer = re.compile(r"model\.layers\.(\d+)\.mlp\.gate")
    routers = [
        m
        for name, m in model.named_modules()
        if (match := layer.fullmatch(name)) and int(match[1]) < model.config.num_hidden_layers  # not the MTP layer
    ]
    chosen: list[torch.Tensor] = []

    def record(module, args, output):
        indices = output[0] if isinstance(model, DeepSeekForCausalLM) else output[2]
        chosen.append(indices.sort(dim=-1).values)

    hooks = [r.register_forward_hook(record) for r in routers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return chosen


def assert_matches_reference(ours, ref) -> None:
    ids = torch.randint(3, 101, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    ours_routes, ref_routes = routing(ours, ids), routing(ref, ids)
    assert len(ours_routes) == len(ref_routes) == ours.config.num_hidden_layers - ours.config.first_k_dense_replace
    for mine, theirs in zip(ours_routes, ref_routes, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("member", list(FAMILY))
def test_family_checkpoint_loads_through_auto_and_matches_transformers(member, tmp_path):
    ref = reference_model(member)
    save_as_published(ref, member, tmp_path / "published")

    config = DeepSeekConfig.from_pretrained(tmp_path / "published")
    assert (config.topk_method, config.scoring_func, config.q_lora_rank) == (
        FAMILY[member]["topk_method"], FAMILY[member]["scoring_func"], FAMILY[member]["q_lora_rank"]
    )  # fmt: skip
    # fp32: the published config says bfloat16, which from_pretrained would otherwise load in
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "published", config=config, dtype=torch.float32).eval()
    assert isinstance(ours, DeepSeekForCausalLM)
    assert_matches_reference(ours, ref)

    ours.save_pretrained(tmp_path / "ours")  # model_type hf_deepseek now: Auto needs no config argument
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert (again.config.topk_method, again.config.scoring_func) == (config.topk_method, config.scoring_func)
    assert_matches_reference(again, ref)


def test_group_limited_greedy_scores_a_group_by_its_best_expert():
    """The two group rules differ: with V2's rule group 0 (one strong expert) wins, with V3's group 1 (two good)."""
    from hf_deepseek.modeling.moe import TopKRouter

    scores = torch.tensor([[0.9, 0.01, 0.6, 0.5]]).logit()  # sigmoid scores: groups {0, 1} and {2, 3}
    for method, expected in (("group_limited_greedy", [0]), ("noaux_tc", [2])):
        cfg = DeepSeekConfig(hidden_size=4, n_routed_experts=4, num_experts_per_tok=1, n_group=2, topk_group=1,
                             topk_method=method, first_k_dense_replace=0, num_hidden_layers=1)  # fmt: skip
        router = TopKRouter(cfg)
        router.weight.data = torch.eye(4)
        router.e_score_correction_bias.zero_()
        indices, _ = router(scores, 1)
        assert indices[0].tolist() == expected, method
    with pytest.raises(ValueError, match=r"DeepSeekConfig.topk_method='top2' is invalid: must be one of"):
        DeepSeekConfig(topk_method="top2")


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An FP8 checkpoint's tensors with every block-scaled weight multiplied out (q * its block's scale_inv)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("_scale_inv"):
            continue
        scale = state.get(key + "_scale_inv")
        if scale is not None:
            rows, cols = tensor.shape
            grid = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            tensor = tensor.float() * grid
        out[key] = tensor
    return out


def test_v3_1_ue8m0_checkpoint_keeps_power_of_two_scales_and_matches_transformers(tmp_path):
    ref = reference_model("v3")
    save_as_published(ref, "v3", tmp_path / "hp")
    high_precision = DeepSeekForCausalLM.from_pretrained(
        tmp_path / "hp", config=DeepSeekConfig.from_pretrained(tmp_path / "hp"), dtype=torch.float32
    )
    save_fp8_pretrained(high_precision, tmp_path / "fp8", FP8Recipe(pow2_scales=True))
    quant = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert quant["scale_fmt"] == "ue8m0"
    # published as DeepSeek-V3.1 is: official config.json, FP8 weights, ue8m0 scales
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(official_config("v3", quantization_config=quant)))
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    scales = {k: v for k, v in stored.items() if k.endswith("weight_scale_inv")}
    assert len(scales) > 20
    for key, scale in scales.items():
        exponent = torch.log2(scale)
        assert torch.equal(exponent, exponent.round()), key

    # the reference: transformers' DeepseekV3 on the weights multiplied out here, independently of our loader
    (tmp_path / "deq").mkdir()
    save_file(dequantized(stored), tmp_path / "deq" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text(json.dumps(official_config("v3")))
    reference = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()

    config = DeepSeekConfig.from_pretrained(tmp_path / "fp8")
    assert config.quantization_config["scale_fmt"] == "ue8m0"
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", config=config, dtype=torch.float32).eval()
    assert_matches_reference(ours, reference)

    # kept in FP8 (no dequantisation): the layers quantise with power-of-two scales, and a save keeps every scale
    from transformers import FineGrainedFP8Config

    kept = DeepSeekForCausalLM.from_pretrained(
        tmp_path / "fp8", dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=False)
    )
    fp8_layers = [m for m in kept.modules() if isinstance(m, FP8InferenceLinear)]
    assert fp8_layers and all(m.fp8_recipe.pow2_scales for m in fp8_layers)
    kept.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    resaved = load_file(tmp_path / "again" / "model.safetensors")
    for key, scale in scales.items():
        assert torch.equal(resaved[key], scale), key
