"""DeepSeekConfig: every DeepSeek-V3 hyper-parameter, validated with errors that name the field.

It also reads the official `config.json` of the DeepSeek family unchanged: V2, V2-Lite, V2.5 (`model_type:
deepseek_v2`: softmax routing, `topk_method` greedy or group_limited_greedy) and V3, R1, V3.1 (`deepseek_v3`),
Kimi-K2 (`kimi_k2`), as published or as transformers' DeepseekV2/V3 configs save them (keys left at that class's
default are omitted there, so they are filled in from it). Unknown keys (`ep_size`, `quantization_config`, ...)
are kept as attributes; legacy `rope_scaling` becomes `rope_parameters` by transformers' own RoPE standardisation.

`save_pretrained` also writes `hf_deepseek_auto.py` beside `config.json`, whose `auto_map` names it, so plain
transformers (and lm-eval, TRL, vLLM's transformers backend) load the directory with `trust_remote_code=True` in a
process that never imported this package; the module only imports `hf_deepseek`, which must be installed.
"""

import os
from dataclasses import dataclass, fields

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

SCORING_FUNCS = ("sigmoid", "softmax")
# how routing restricts experts to groups: V3's group score is the sum of its top-2 experts' (biased) scores, V2's
# (`group_limited_greedy`) its best expert's score; `greedy` (V2-Lite) takes the top-k over all experts
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
AUTO_MODULE = "hf_deepseek_auto"
AUTO_MODULE_SOURCE = '''"""Lets transformers load this checkpoint by path (`trust_remote_code=True`), no import needed.

Written by hf-deepseek\'s `save_pretrained`; the code itself lives in the installed `hf-deepseek` package."""

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM, DeepSeekModel

__all__ = ["DeepSeekConfig", "DeepSeekForCausalLM", "DeepSeekModel"]
'''
AUTO_MAP = {
    "AutoConfig": f"{AUTO_MODULE}.DeepSeekConfig",
    "AutoModel": f"{AUTO_MODULE}.DeepSeekModel",
    "AutoModelForCausalLM": f"{AUTO_MODULE}.DeepSeekForCausalLM",
}


@strict(accept_kwargs=True)
@dataclass(repr=False)
class DeepSeekConfig(PreTrainedConfig):
    """Configuration of a DeepSeek-V3 model; the defaults are DeepSeek-V3's own (671B) numbers.

    Fields beyond the official config: `mtp_loss_weight` (lambda of the MTP loss), `aux_loss_alpha`
    (weight of the sequence-wise balance loss, 0 disables it). `scoring_func` and `topk_method` cover the rest of
    the family: V2 is `softmax` with `group_limited_greedy` (V2-Lite: `greedy`), V3 `sigmoid` with `noaux_tc`.
    """

    model_type = "hf_deepseek"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_nextn_predict_layers: int = 1
    mtp_loss_weight: float = 0.3
    aux_loss_alpha: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        kwargs.pop("head_dim", None)
        kwargs.pop("model_type", None)  # an official config says "deepseek_v3"; this class is always "hf_deepseek"
        kwargs.pop("qk_head_dim", None)
        # An official config names DeepSeek's remote code here, which a saved checkpoint does not ship: replaced by
        # this package's own module (see the module docstring)
        kwargs.pop("auto_map", None)
        self.validate_deepseek()
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.head_dim = self.qk_rope_head_dim  # the rotary dimension, read by transformers' RoPE initialisers
        super().__post_init__(**kwargs)
        self.auto_map = dict(AUTO_MAP)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers' `from_dict`, after filling in what an official DeepSeek-V2 / V3 config leaves out."""
        return super().from_dict(official_defaults(config_dict), **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """A no-op: transformers calls it on classes loaded through `auto_map`, to copy their source files into the
        next save; `auto_map` must keep naming `hf_deepseek_auto` instead."""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """transformers' `save_pretrained`, plus the module `auto_map` names (`hf_deepseek_auto.py`)."""
        self.auto_map = dict(AUTO_MAP)
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, f"{AUTO_MODULE}.py"), "w") as f:  # first: a push uploads it too
            f.write(AUTO_MODULE_SOURCE)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: the first `first_k_dense_replace` layers are dense, then every `moe_layer_freq`-th."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def validate_deepseek(self) -> None:
        """Raise `ValueError` naming the field and the rule for any inconsistent value."""

        def fail(field: str, rule: str) -> None:
            raise ValueError(f"DeepSeekConfig.{field}={getattr(self, field)!r} is invalid: {rule}")

        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "moe_layer_freq",
        ]
        for field in positive:
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", "must be a positive integer, or None for a plain q projection")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        for field in ("first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts"):
            if getattr(self, field) < 0:
                fail(field, "must be >= 0")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be > 0")
        if self.mtp_loss_weight < 0:
            fail("mtp_loss_weight", "must be >= 0")
        if self.aux_loss_alpha < 0:
            fail("aux_loss_alpha", "must be >= 0")
        if not 0 <= self.attention_dropout < 1:
            fail("attention_dropout", "must be in [0, 1)")
        if self.num_key_value_heads != self.num_attention_heads:
            fail(
                "num_key_value_heads",
                f"MLA shares one latent across heads; must equal num_attention_heads ({self.num_attention_heads})",
            )
        if self.first_k_dense_replace >= self.num_hidden_layers:
            return  # a dense model: the routing fields are unused
        if self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", "must be a positive integer")
        if self.n_routed_experts <= 0:
            fail("n_routed_experts", "must be a positive integer")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            fail("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
        if self.n_group <= 0:
            fail("n_group", "must be a positive integer")
        if self.n_routed_experts % self.n_group:
            fail("n_routed_experts", f"must be divisible by n_group={self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            fail("topk_group", f"must be in [1, n_group={self.n_group}]")
        if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            fail(
                "topk_group",
                f"the {self.topk_group} kept group(s) of {self.n_routed_experts // self.n_group} "
                f"experts hold fewer than num_experts_per_tok={self.num_experts_per_tok}",
            )
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"must be one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"must be one of {TOPK_METHODS}")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be > 0")


def official_defaults(config_dict: dict) -> dict:
    """An official `deepseek_v2` / `deepseek_v3` / `kimi_k2` config dict with every key this class reads: missing keys
    take the value of transformers' DeepseekV2Config / DeepseekV3Config (what the dict was written against), a V2
    model scores experts with softmax, and `n_group` / `topk_group` left at None mean one group."""
    model_type = config_dict.get("model_type")
    if model_type not in ("deepseek_v2", "deepseek_v3", "kimi_k2"):  # Kimi-K2 is the V3 architecture, renamed
        return config_dict
    from transformers import DeepseekV2Config, DeepseekV3Config

    reference = DeepseekV2Config if model_type == "deepseek_v2" else DeepseekV3Config
    ours = {f.name for f in fields(DeepSeekConfig)}
    filled = dict(config_dict)
    for field in fields(reference):
        if field.name in ours and field.name not in filled and field.name != "rope_parameters":
            filled[field.name] = field.default
    if model_type == "deepseek_v2":
        filled.setdefault("scoring_func", "softmax")
        filled.setdefault("topk_method", "greedy")
        filled.setdefault("num_nextn_predict_layers", 0)  # V2 has no MTP module
    if filled.get("n_group") is None:
        filled["n_group"] = 1
    if filled.get("topk_group") is None:
        filled["topk_group"] = filled["n_group"]
    return filled


__all__ = ["DeepSeekConfig", "official_defaults"]
