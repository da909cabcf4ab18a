"""DeepSeekConfig: every DeepSeek-V3 hyper-parameter, validated with errors that name the field.

It also reads an official DeepSeek-V3 / R1 `config.json` (`model_type: deepseek_v3`) unchanged: unknown keys
(`topk_method`, `ep_size`, `quantization_config`, ...) are kept as attributes, legacy `rope_scaling` is
converted to `rope_parameters` by transformers' own RoPE standardisation.
"""

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

SCORING_FUNCS = ("sigmoid", "softmax")


@strict(accept_kwargs=True)
@dataclass(repr=False)
class DeepSeekConfig(PreTrainedConfig):
    """Configuration of a DeepSeek-V3 model; the defaults are DeepSeek-V3's own (671B) numbers.

    Fields beyond the official config: `mtp_loss_weight` (lambda of the MTP loss), `aux_loss_alpha`
    (weight of the sequence-wise balance loss, 0 disables it).
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
        # An official config names a remote-code class here; this plugin registers its own Auto classes, and
        # TRL reloads reference models from `auto_map`, so it must stay empty.
        kwargs.pop("auto_map", None)
        self.validate_deepseek()
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.head_dim = self.qk_rope_head_dim  # the rotary dimension, read by transformers' RoPE initialisers
        super().__post_init__(**kwargs)
        self.auto_map = {}

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
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be > 0")


__all__ = ["DeepSeekConfig"]
