"""DeepSeekModel and DeepSeekForCausalLM: the transformers-facing surface of the network.

tokens -> embedding -> decoder layers -> final norm -> lm_head -> logits. With `labels` the MTP modules
run on the final hidden state and the shifted token embeddings, and the loss is
main CE + mtp_loss_weight * mean_k(MTP CE_k) + the routers' sequence-wise balance loss (when enabled).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils import can_return_tuple

from ..configuration import DeepSeekConfig
from .attention import RotaryEmbedding
from .checkpoint import add_mtp_shared_copies
from .checkpoint_checks import atomic_save, verify_local_checkpoint
from .compile_regions import decode_compile_config
from .decode_linear import use_decode_linears
from .decoder_layer import DeepSeekDecoderLayer
from .fp8_checkpoint import load_fp8_pretrained, wants_fp8_loader
from .input_checks import check_model_inputs
from .latent_cache import LatentCacheGenerationMixin, host_seq_length
from .layers import RMSNorm
from .moe import DeepSeekMoE, TopKRouter
from .mtp import MTPLayer, mtp_labels, shift_left
from .output_loss import causal_lm_loss
from .pretrained import CACHE_FIELD, DeepSeekCausalLMOutput, DeepSeekPreTrainedModel
from .speculative import speculative_generate


class DeepSeekModel(DeepSeekPreTrainedModel):
    """The backbone. `layers` holds the decoder layers followed by the MTP modules (official indices)."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        n = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DeepSeekDecoderLayer(config, i) for i in range(n)]
            + [MTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.layers[self.config.num_hidden_layers :]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        """`output_hidden_states`, `output_attentions` and `return_dict` default to the config's values."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        cache = cache if cache is not None else past_key_values
        past = host_seq_length(cache)  # None inside a compiled decode step (a static cache's length lives on device)
        check_model_inputs(self.config, input_ids, inputs_embeds, position_ids, past)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        mask, position_embeddings, position_ids = self.attention_inputs(
            inputs_embeds, attention_mask, position_ids, cache
        )
        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.decoder_layers:
            hidden_states = layer(
                hidden_states, position_embeddings, mask, cache=cache, output_attentions=output_attentions, **kwargs
            )
            if output_attentions:
                hidden_states, weights = hidden_states
                all_attentions.append(weights)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        out = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden and tuple(all_hidden),
            attentions=all_attentions and tuple(all_attentions),
        )
        if use_cache:  # no entry at all without a cache: generate() would try to reorder a None one
            out[CACHE_FIELD] = cache
        return out

    def attention_inputs(self, inputs_embeds, attention_mask, position_ids, cache):
        """The causal mask, the rotary tables and the position ids for a pass (shared with the MTP modules)."""
        given_positions = position_ids
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen
        sdpa_causal = self.config._attn_implementation == "sdpa" and getattr(self.config, "is_causal", True)
        if attention_mask is None and cache is None and given_positions is None and sdpa_causal:
            # a plain causal pass (training): SDPA's is_causal, no mask, as transformers decides outside tracing;
            # transformers 5.17 materialises the mask while a CUDA graph is captured (its tracing check counts
            # stream capture), which a captured training step must not see
            mask = None
        else:
            # positional: the 4th parameter is `past_key_values` in transformers 5.17 and `cache` in 5.24. Position
            # ids made here are one sequence a row: transformers' search for packed sequences in them (a host read
            # of the device, a sync every training forward) has nothing to find
            mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, given_positions)
        return mask, self.rotary_emb(inputs_embeds, position_ids), position_ids


class DeepSeekForCausalLM(LatentCacheGenerationMixin, DeepSeekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # set by each speculative generate(): acceptance_rate, tokens_per_step, draft_tokens, accepted, steps
    last_speculative_stats: dict | None = None

    def __init__(self, config: DeepSeekConfig):
        super().__init__(config)
        self.model = DeepSeekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader, except for DeepSeek's block-scaled FP8 checkpoints: those go to `fp8_checkpoint`
        (FP8 GEMMs on a GPU, exact dequantisation elsewhere), as transformers' FP8 quantizer knows neither the
        stacked experts nor partial 128x128 blocks. A local checkpoint is checked first (`checkpoint_checks`):
        truncated files, missing, mis-shaped or non-finite tensors raise `CheckpointError` naming file and tensor;
        `check_finite=False` skips the pass over the values, `use_safetensors=False` allows pickle weights."""
        fp8 = wants_fp8_loader(pretrained_model_name_or_path, kwargs)
        verify_local_checkpoint(pretrained_model_name_or_path, kwargs, cls, fp8)
        kwargs.pop("check_finite", None)
        if fp8:
            return load_fp8_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """Writes the official DeepSeek-V3 layout (per-expert tensors, full MTP layer), sharded safetensors.
        Atomically: the files go to a temporary sibling directory first, so an interrupted save leaves the
        previous checkpoint in `save_directory` loadable."""
        if state_dict is None:
            state_dict = self.state_dict()
        state_dict = add_mtp_shared_copies(state_dict, self.config)
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        save = super().save_pretrained
        return atomic_save(lambda tmp: save(tmp, *args, state_dict=state_dict, **kwargs), save_directory)

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """transformers' `generate`; with `mtp_speculative=True` or `use_mtp=True` (argument or generation config) MTP
        self-speculative decoding instead (`speculative.py`): greedy gives the same tokens and sampling the same
        distribution, in fewer main-model passes, at any batch size. It sets `last_speculative_stats`. Greedy with
        one draft per step runs on the device by default on CUDA (`generation/fast_speculative.py`: one compiled
        step, no host sync per step; `fast_loop=True` anywhere, `fast_loop=False` keeps the eager loop).
        Otherwise, where `generate()` takes the static latent cache on CUDA, its token loop runs on the device
        (`generation/fast_generate.py`: greedy gives the same tokens, sampling the same distribution, no host sync
        per token) unless the call needs more than it offers; `fast_loop=True` asks for it anywhere (CPU included),
        `fast_loop=False` keeps transformers' loop (also a generation config field)."""
        config = generation_config or self.generation_config
        speculative = kwargs.pop("mtp_speculative", None)
        # transformers' own flag: its drafter needs config.num_mtp_layers, which this model lacks, so it drafts here
        use_mtp = kwargs.pop("use_mtp", None)
        if speculative is None:
            speculative = getattr(config, "mtp_speculative", False) or (
                use_mtp if use_mtp is not None else getattr(config, "use_mtp", False)
            )
        fast_loop = kwargs.pop("fast_loop", getattr(config, "fast_loop", None))
        if speculative:
            return speculative_generate(self, inputs, generation_config, fast_loop=fast_loop, **kwargs)
        if fast_loop is not False:
            from ..generation.fast_generate import try_fast_generate

            tokens = try_fast_generate(self, inputs, generation_config, kwargs, fast_loop)
            if tokens is not None:
                return tokens
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def get_compiled_call(self, compile_config):
        """transformers' compiled forward for the static-cache decode loop, after `use_decode_linears` (a no-op
        with HF_DEEPSEEK_LINEAR_GEMV=0), with `decode_compile_config`'s settings (FP8 layers: cuBLAS GEMMs)."""
        use_decode_linears(self)
        compile_config = compile_config or self._default_compile_config()
        return super().get_compiled_call(decode_compile_config(self, compile_config))

    def routers(self) -> list[TopKRouter]:
        """The MoE routers of the main decoder layers, in layer order (MTP layers excluded)."""
        return [layer.mlp.gate for layer in self.model.decoder_layers if isinstance(layer.mlp, DeepSeekMoE)]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_expert_load: bool = False,
        cache: Cache | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> DeepSeekCausalLMOutput:
        """`labels` [B, T] (shifted inside) or `shift_labels` [B, T] (already shifted: position t's target, as
        transformers' loss takes them) give the loss; `return_dict=False` returns a tuple."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        fused = self._fused_loss(labels, logits_to_keep)
        logits = None if fused else self.lm_head(hidden_states[:, keep, :])

        if labels is None and shift_labels is not None:
            # the MTP terms read unshifted labels; the last target of each row is one only the main head predicts
            labels = F.pad(shift_labels[:, :-1], (1, 0), value=-100)
        loss = mtp_loss = aux_loss = None
        # With `num_items_in_batch` (Trainer: label tokens of all accumulated micro-batches, all ranks) the
        # main loss is this batch's share of a sum the Trainer adds up undivided; the MTP and balance terms
        # are means over this batch, so they take the same share, or count once per micro-batch.
        share = 1.0
        if labels is not None and num_items_in_batch is not None:
            items = torch.as_tensor(num_items_in_batch, device=labels.device)
            targets = shift_labels if shift_labels is not None else labels[..., 1:]
            share = (targets != -100).sum() / items
        if labels is not None:
            loss = self._output_loss(hidden_states, logits, labels, num_items_in_batch, shift_labels)
            if self.config.num_nextn_predict_layers > 0:
                mtp_loss = self._mtp_loss(
                    input_ids, inputs_embeds, attention_mask, position_ids, hidden_states, labels, **kwargs
                )
                loss = loss + share * self.config.mtp_loss_weight * mtp_loss
        aux_losses = [r.last_aux_loss for r in self.routers() if r.last_aux_loss is not None]
        if aux_losses:
            aux_loss = torch.stack(aux_losses).sum()
            loss = loss + share * aux_loss if loss is not None else None
        expert_load = torch.stack([r.last_expert_load for r in self.routers()]) if output_expert_load else None

        result = DeepSeekCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            mtp_loss=mtp_loss,
            expert_load=expert_load,
        )
        if outputs.get(CACHE_FIELD) is not None:
            result[CACHE_FIELD] = outputs[CACHE_FIELD]
        return result

    def _mtp_loss(
        self, input_ids, inputs_embeds, attention_mask, position_ids, hidden_states, labels, **kwargs
    ) -> torch.Tensor:
        """Mean over depths of the cross-entropy of each MTP module (depth k predicts token t+1+k)."""
        embeds = inputs_embeds if input_ids is None else self.model.embed_tokens(input_ids)
        mask, position_embeddings, position_ids = self.model.attention_inputs(
            embeds, attention_mask, position_ids, None
        )
        previous, losses = hidden_states, []
        for depth, layer in enumerate(self.model.mtp_layers, start=1):
            shifted = shift_left(embeds, depth, 0.0)
            previous, normed = layer.forward_mtp(shifted, previous, position_embeddings, mask, **kwargs)
            logits = None if self._fused_loss(labels, 0) else self.lm_head(normed)
            target = mtp_labels(labels, depth, position_ids.expand_as(labels))
            # sum / count rather than a mean, so a batch too short for this depth gives 0, not NaN
            count = (target[:, 1:] != -100).sum().clamp(min=1)
            losses.append(self._output_loss(normed, logits, target, count))
        return torch.stack(losses).mean()

    fused_output_loss: int = 0  # chunks of `output_loss.causal_lm_loss` in training (0: the plain head and loss)

    def _fused_loss(self, labels, logits_to_keep) -> bool:
        return bool(self.fused_output_loss) and self.training and labels is not None and logits_to_keep == 0

    def _output_loss(self, hidden, logits, labels, num_items_in_batch, shift_labels=None) -> torch.Tensor:
        """The causal LM loss of the head over `hidden`: from `logits`, or chunked without them (None)."""
        if logits is None:
            chunks = self.fused_output_loss
            return causal_lm_loss(hidden, self.lm_head, labels, num_items_in_batch, chunks, shift_labels)
        return self.loss_function(
            logits,
            labels,
            vocab_size=self.config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            shift_labels=shift_labels,
        )


__all__ = ["DeepSeekPreTrainedModel", "DeepSeekModel", "DeepSeekForCausalLM", "DeepSeekCausalLMOutput"]
