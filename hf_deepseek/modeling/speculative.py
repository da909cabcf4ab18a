"""MTP self-speculative decoding at any batch size, greedy or sampling, and its draft acceptance statistics.

Each step the MTP modules (`mtp_drafter.py`) draft D tokens per row (depth k the k-th token after the newest
committed one), and one main-model pass over [newest token, d_1 .. d_D] verifies them and yields the token after
the kept ones. Greedy: drafts are kept while they equal the main model's argmax. Sampling: d_i is kept with
probability min(1, p(x)/q(x)), and the first rejected one is replaced by a sample of normalize(max(p - q, 0))
(Leviathan et al. 2023), so the output is distributed exactly as plain sampling from p. A pass commits 1 to D+1
tokens per row.

Rows keep different numbers of tokens, yet the latent caches stay rectangular: a rejected draft's slot stays in
the main and MTP caches as a hole that the attention mask hides (cropped where every row rejected), and each row
keeps its own position ids, as with left padding. Rows leave the batch when they reach eos or max_new_tokens.
"""

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .mtp_drafter import MTPDrafter
from .pretrained import DeepSeekPreTrainedModel

# generate() options that change the logits or the search; speculative decoding runs none of them
UNSUPPORTED_OPTIONS = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "force_words_ids", "min_length", "min_new_tokens", "sequence_bias", "suppress_tokens",
    "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
    "guidance_scale", "renormalize_logits", "constraints", "top_h", "epsilon_cutoff", "eta_cutoff",
    "watermarking_config", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "penalty_alpha", "diversity_penalty", "prompt_lookup_num_tokens", "stop_strings", "max_time", "token_healing",
    "dola_layers",
)  # fmt: skip
# generate() arguments besides the generation config that speculative decoding accepts
ACCEPTED_ARGUMENTS = ("input_ids", "attention_mask", "mtp_draft_tokens")
logger = logging.get_logger(__name__)


@dataclass
class DraftStats:
    """Counts for one generation: drafts proposed and accepted, main-model passes, and new tokens committed.
    `row_passes` adds up the rows in the batch at each pass, so `tokens_per_step` is per row."""

    drafted: int = 0
    accepted: int = 0
    main_passes: int = 0
    committed: int = 0
    row_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.committed / self.row_passes if self.row_passes else 0.0

    def as_dict(self) -> dict:
        """The figures `DeepSeekForCausalLM.last_speculative_stats` holds (the decode benchmark reads these keys)."""
        return {
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_step": self.tokens_per_step,
            "draft_tokens": self.drafted,
            "accepted": self.accepted,
            "steps": self.main_passes,
        }


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """min(1, p(x)/q(x)) for the draft x of each row; p, q [N, V] target and draft distributions, draft [N]
    sampled from q (so q(x) > 0)."""
    p_x, q_x = p.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
    return (p_x / q_x).clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)), what a rejected draft is resampled from; p itself where p == q (never rejected)."""
    residual = (p - q).clamp(min=0.0)
    total = residual.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def sampling_warpers(config: GenerationConfig) -> LogitsProcessorList:
    """The sampling warpers `generate` builds from `config`, in its order (temperature, top-k, top-p, min-p,
    typical); each depends on the scores only, so one list serves drafts and verification alike."""
    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p))
    return warpers


class TokenChooser:
    """Greedy argmax (`warpers` None), or a sample from softmax(warpers(logits)), as `generate` chooses tokens."""

    def __init__(self, warpers: LogitsProcessorList | None = None):
        self.warpers = warpers

    @property
    def sampling(self) -> bool:
        return self.warpers is not None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, V] -> the distribution sampled from [N, V] (fp32, as `generate` upcasts)."""
        no_ids = torch.empty(logits.shape[0], 0, dtype=torch.long, device=logits.device)  # the warpers ignore ids
        return self.warpers(no_ids, logits.float()).softmax(dim=-1)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [N, V] -> tokens [N], and the distribution they were sampled from (None when greedy)."""
        if not self.sampling:
            return logits.argmax(dim=-1), None
        probs = self.probs(logits)
        return torch.multinomial(probs, 1)[:, 0], probs


def _eos_ids(model: DeepSeekPreTrainedModel, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def _check_model(model: DeepSeekPreTrainedModel) -> None:
    if model.config.num_nextn_predict_layers < 1:
        raise ValueError(
            "MTP speculative decoding needs an MTP module, but this model has none "
            "(config.num_nextn_predict_layers == 0); use plain generate()"
        )


def verify_drafts(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, chooser: "TokenChooser"):
    """logits [B, D+1, V] of the main model at [newest token, d_1 .. d_D]; drafts [B, D]; q [B, D, V] their
    distributions (None: greedy). Returns how many drafts each row keeps [B] and the token after them [B]."""
    batch, count = drafts.shape
    rows = torch.arange(batch, device=drafts.device)
    if not chooser.sampling:
        target = logits.argmax(dim=-1)  # [B, D+1]
        kept = (drafts == target[:, :count]).long().cumprod(dim=1).sum(dim=1)  # the leading run of matches
        return kept, target[rows, kept]
    p = chooser.probs(logits.flatten(0, 1)).view(*logits.shape)  # [B, D+1, V]
    keep_probability = acceptance_probability(p[:, :count].flatten(0, 1), q.flatten(0, 1), drafts.flatten())
    accepted = torch.rand(batch * count, device=drafts.device) < keep_probability
    kept = accepted.view(batch, count).long().cumprod(dim=1).sum(dim=1)
    # the first rejected draft is resampled from the residual; if all were kept, the next token comes from p
    rejected_at = kept.clamp(max=count - 1)
    residual = residual_distribution(p[rows, rejected_at], q[rows, rejected_at])
    after = torch.where((kept == count)[:, None], p[:, count], residual)
    return kept, torch.multinomial(after, 1)[:, 0]


@torch.no_grad()
def speculative_decode(
    model: DeepSeekPreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    chooser: TokenChooser | None = None,
    stats: DraftStats | None = None,
    draft_tokens: int | None = None,
) -> Iterator[dict[int, list[int]]]:
    """Speculative decoding of a (left-padded) batch; yields, per main-model pass, {row: tokens it committed}.

    A row's tokens end with an eos token or at `max_new_tokens`; rows that ended are left out of later yields.
    `chooser` picks tokens (greedy by default); `draft_tokens` per step (default: one per MTP module); `stats`, if
    given, is updated as generation goes. Closing the iterator stops generation at once.
    """
    _check_model(model)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1; got {list(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("MTP speculative decoding needs left padding: every row's last token must be unmasked")
    chooser = chooser if chooser is not None else TokenChooser()
    count = draft_tokens if draft_tokens is not None else model.config.num_nextn_predict_layers
    drafter = MTPDrafter(model, chooser, count)
    if max_new_tokens <= 0:
        return
    stats = stats if stats is not None else DraftStats()
    eos = _eos_ids(model, eos_token_id)
    backbone = model.model
    cache = DynamicCache(config=model.config)
    device = input_ids.device
    batch = input_ids.shape[0]
    rows = list(range(batch))  # the original index of each row still in the batch
    produced = [0] * batch

    def commit(new: list[list[int]]) -> tuple[dict[int, list[int]], list[bool]]:
        """Cut each row's tokens at eos / max_new_tokens; returns them by original row and which rows go on."""
        out, alive = {}, []
        for i, tokens in enumerate(new):
            row, kept = rows[i], []
            for t in tokens:
                kept.append(t)
                produced[row] += 1
                if t in eos or produced[row] >= max_new_tokens:
                    break
            out[row] = kept
            alive.append(kept[-1] not in eos and produced[row] < max_new_tokens)
            stats.committed += len(kept)
        return out, alive

    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        return_dict=True,
    ).last_hidden_state  # [B, T, d], normed
    stats.main_passes, stats.row_passes = stats.main_passes + 1, stats.row_passes + batch
    token, _ = chooser.choose(model.lm_head(hidden[:, -1]))
    out, alive = commit([[t] for t in token.tolist()])
    yield out
    if not any(alive):
        return
    drafts, q = drafter.prefill(hidden, torch.cat([input_ids[:, 1:], token[:, None]], 1), attention_mask, position_ids)
    slots = attention_mask  # [B, S]: 1 where a cache slot holds a committed token, in the main and MTP caches
    length = attention_mask.sum(-1)  # [B]: position of `token`, the newest committed token (not yet cached)
    offsets = torch.arange(count + 1, device=device)

    while True:
        if not all(alive):  # rows that ended leave the batch, and the caches
            keep = torch.tensor([i for i, a in enumerate(alive) if a], device=device)
            rows = [rows[i] for i in keep.tolist()]
            cache.batch_select_indices(keep)
            drafter.select(keep)
            slots, length, token, drafts = slots[keep], length[keep], token[keep], drafts[keep]
            q = q[keep] if q is not None else None
        batch = len(rows)
        positions = length[:, None] + offsets  # [B, D+1]
        slots = torch.cat([slots, slots.new_ones(batch, count + 1)], dim=1)
        hidden = backbone(
            input_ids=torch.cat([token[:, None], drafts], dim=1),
            attention_mask=slots,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            return_dict=True,
        ).last_hidden_state  # [B, D+1, d]
        kept, bonus = verify_drafts(model.lm_head(hidden), drafts, q, chooser)
        stats.main_passes, stats.row_passes = stats.main_passes + 1, stats.row_passes + batch
        stats.drafted += batch * count
        stats.accepted += int(kept.sum())
        slots[:, -(count + 1) :] = (offsets <= kept[:, None]).long()  # rejected drafts' slots become holes
        kept_list = kept.tolist()
        new = [d[:k] + [b] for d, k, b in zip(drafts.tolist(), kept_list, bonus.tolist(), strict=True)]
        out, alive = commit(new)
        yield out
        if not any(alive):
            return
        # MTP entries for the new slots: slot j reads the token after it (kept drafts, then the bonus token)
        padded = torch.cat([drafts, bonus[:, None]], dim=1)
        next_ids = torch.where(offsets < kept[:, None], padded, bonus[:, None])
        drafts, q = drafter.step(hidden, next_ids, slots, positions, kept)
        unused = count - max(kept_list)  # trailing slots that are holes in every row
        if unused:
            cache.crop(-unused)
            drafter.crop(unused)
            slots = slots[:, :-unused]
        length, token = length + 1 + kept, bonus


def _is_neutral(value) -> bool:
    """Whether a generation option's value leaves the logits alone (unset, off, 0 or a factor of 1)."""
    if value is None or value is False:
        return True
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1)


def speculative_generate(
    model: DeepSeekPreTrainedModel,
    inputs: torch.LongTensor | None = None,
    generation_config: GenerationConfig | None = None,
    fast_loop: bool | None = None,
    **kwargs,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """`generate()` with MTP speculative decoding: same arguments, same output shape (prompt + new tokens, rows
    that ended early filled with `pad_token_id`), plus `mtp_draft_tokens` (drafts per step, 1 to the number of MTP
    modules; default all). Sets `model.last_speculative_stats`. Greedy decoding with one draft per step takes the
    device loop (`generation/fast_speculative.py`) where `wants_fast_speculative` says so; a compiled step that
    fails (unless `fast_loop=True`) is warned about once and this eager loop takes over."""
    _check_model(model)
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    arguments = config.update(**kwargs)
    config.use_mtp = None  # transformers' name for what this function does
    arguments.pop("mtp_speculative", None)
    unknown = sorted(k for k, v in arguments.items() if k not in ACCEPTED_ARGUMENTS and v is not None)
    if unknown:
        raise ValueError(f"MTP speculative decoding does not take these generate() arguments: {', '.join(unknown)}")
    if (config.num_beams or 1) > 1 or (config.num_beam_groups or 1) > 1:
        raise ValueError("MTP speculative decoding does not do beam search; set num_beams=1 or drop mtp_speculative")
    unsupported = sorted(name for name in UNSUPPORTED_OPTIONS if not _is_neutral(getattr(config, name, None)))
    if unsupported:
        raise ValueError(f"MTP speculative decoding does not support the generation options {', '.join(unsupported)}")
    input_ids = inputs if inputs is not None else arguments.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("MTP speculative decoding needs token ids input_ids [batch, length] (no inputs_embeds)")
    attention_mask = arguments.get("attention_mask")
    if config.num_return_sequences is not None and config.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    prompt_length = input_ids.shape[1]
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = config.max_length - prompt_length if config.max_length is not None else 20
    eos = sorted(_eos_ids(model, [] if config.eos_token_id is None else config.eos_token_id))  # None: no eos
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    chooser = TokenChooser(sampling_warpers(config) if config.do_sample else None)

    draft_tokens = arguments.get("mtp_draft_tokens")
    sequences = _try_fast_speculative(
        model, input_ids, attention_mask, max_new_tokens, eos, pad, config, draft_tokens, fast_loop
    )
    if sequences is not None:
        return GenerateDecoderOnlyOutput(sequences=sequences) if config.return_dict_in_generate else sequences
    stats, new = DraftStats(), [[] for _ in range(input_ids.shape[0])]
    steps = speculative_decode(model, input_ids, attention_mask, max_new_tokens, eos, chooser, stats, draft_tokens)
    for committed in steps:
        for row, tokens in committed.items():
            new[row].extend(tokens)
    model.last_speculative_stats = stats.as_dict()
    width = max(len(tokens) for tokens in new)
    generated = input_ids.new_full((input_ids.shape[0], width), pad)
    for row, tokens in enumerate(new):
        generated[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, generated], dim=1)
    return GenerateDecoderOnlyOutput(sequences=sequences) if config.return_dict_in_generate else sequences


def _try_fast_speculative(
    model,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    eos: list[int],
    pad: int,
    config: GenerationConfig,
    draft_tokens,
    fast_loop: bool | None,
) -> torch.Tensor | None:
    """The device loop's tokens (setting `last_speculative_stats`), or None where the eager loop should run."""
    from ..generation import fast_generate as fg  # generation/ builds on modeling/, not the other way round
    from ..generation import fast_speculative as fs

    if max_new_tokens < 1 or not fs.wants_fast_speculative(model, config, draft_tokens, fast_loop):
        return None
    if not fast_loop and model.__dict__.get("fast_speculative_error"):
        return None
    try:
        sequences, model.last_speculative_stats = fs.fast_speculative_generate(
            model, input_ids, attention_mask, max_new_tokens, eos, pad, config
        )
    except fs.SpeculativeStepError as error:
        if fast_loop:
            raise error.__cause__ from None
        fg.remember_failure(model, error, "fast_speculative_error", "_fast_speculative_buffers")
        logger.warning(
            f"generate(mtp_speculative=True): the device loop failed ({model.fast_speculative_error}); this model "
            "uses the eager speculative loop from now on. generate(..., fast_loop=True) raises the error instead."
        )
        return None
    return sequences


def mtp_speculative_stream(
    model: DeepSeekPreTrainedModel,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    stats: DraftStats | None = None,
) -> Iterator[list[int]]:
    """Greedy generation of one sequence (input_ids [1, T]) with MTP drafts; yields the token ids each main-model
    pass commits. Stops after an eos token (which is yielded) or `max_new_tokens` tokens. For batches, use
    `model.generate(..., mtp_speculative=True)`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"mtp_speculative_stream takes one sequence, input_ids [1, T]; got {list(input_ids.shape)} "
            "(for a batch use model.generate(..., mtp_speculative=True))"
        )
    for committed in speculative_decode(model, input_ids, None, max_new_tokens, eos_token_id, stats=stats):
        yield committed[0]


def mtp_greedy_generate(
    model: DeepSeekPreTrainedModel,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
) -> tuple[torch.LongTensor, DraftStats]:
    """Like `model.generate(input_ids, do_sample=False)` for one sequence: returns prompt + new ids, and stats."""
    stats = DraftStats()
    new = [t for chunk in mtp_speculative_stream(model, input_ids, max_new_tokens, eos_token_id, stats) for t in chunk]
    return torch.cat([input_ids, input_ids.new_tensor([new])], dim=1), stats


__all__ = [
    "DraftStats",
    "MTPDrafter",
    "TokenChooser",
    "verify_drafts",
    "acceptance_probability",
    "mtp_greedy_generate",
    "mtp_speculative_stream",
    "residual_distribution",
    "sampling_warpers",
    "speculative_decode",
    "speculative_generate",
]
