"""MTP self-speculative decoding (greedy, batch size 1) and its draft acceptance statistics.

The first MTP module drafts the token after next from the main model's final normed hidden state h_t and the
embedding of token t+1; one main-model pass over [x_t, draft] then verifies the draft and yields the greedy
token after it, so each pass commits one token (draft rejected) or two (draft accepted). The output is
exactly plain greedy decoding; only the number of main-model passes changes.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from .model import DeepSeekForCausalLM


@dataclass
class DraftStats:
    """Counts for one generation: drafts proposed and accepted, and main-model forward passes."""

    drafted: int = 0
    accepted: int = 0
    main_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class _MTPDrafter:
    """Runs the first MTP module incrementally, with its own latent cache, and returns its greedy draft."""

    def __init__(self, model: DeepSeekForCausalLM):
        self.model = model
        self.layer = model.model.mtp_layers[0]
        self.cache = DynamicCache()  # grows layers lazily, so the MTP layer's index (num_hidden_layers) fits

    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, start: int) -> int:
        """hidden [1, k, d]: h_t for t = start .. start+k-1; next_ids [1, k]: token t+1 for each. Predicts t+2."""
        backbone = self.model.model
        embeds = backbone.embed_tokens(next_ids)
        position_ids = torch.arange(start, start + next_ids.shape[1], device=next_ids.device)[None]
        position_embeddings = backbone.rotary_emb(embeds, position_ids)
        # first call: a plain causal mask; later calls attend over the cache (MLA builds the offset mask itself)
        mask = backbone.attention_inputs(embeds, None, position_ids, None)[0] if start == 0 else None
        _, normed = self.layer.forward_mtp(embeds, hidden, position_embeddings, mask, cache=self.cache)
        return int(self.model.lm_head(normed[:, -1]).argmax(-1).item())


def _eos_ids(model: DeepSeekForCausalLM, eos_token_id: int | list[int] | None) -> set[int]:
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.no_grad()
def mtp_speculative_stream(
    model: DeepSeekForCausalLM,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    stats: DraftStats | None = None,
) -> Iterator[list[int]]:
    """Greedy generation with MTP drafts; yields the token ids committed by each main-model pass.

    `input_ids` [1, T]. Stops after an eos token (which is yielded) or `max_new_tokens` tokens. `stats`, if
    given, is updated as generation goes. Closing the iterator stops generation at once.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"MTP speculative decoding takes one sequence, input_ids [1, T]; got {list(input_ids.shape)}")
    if model.config.num_nextn_predict_layers < 1:
        raise ValueError("this model has no MTP module (config.num_nextn_predict_layers == 0)")
    if max_new_tokens <= 0:
        return
    stats = stats if stats is not None else DraftStats()
    eos = _eos_ids(model, eos_token_id)
    backbone, drafter = model.model, _MTPDrafter(model)
    cache = DynamicCache(config=model.config)

    def main_pass(ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        hidden = backbone(input_ids=ids, cache=cache, use_cache=True).last_hidden_state  # [1, k, d], normed
        stats.main_passes += 1
        return hidden, model.lm_head(hidden).argmax(-1)[0].tolist()

    hidden, greedy = main_pass(input_ids)
    token, produced = greedy[-1], 1
    yield [token]
    if token in eos or produced >= max_new_tokens:
        return
    next_ids = torch.cat([input_ids[:, 1:], input_ids.new_tensor([[token]])], dim=1)
    draft = drafter.draft(hidden, next_ids, start=0)
    position = input_ids.shape[1]  # position of `token`, the newest committed token, not yet in the cache
    while True:
        hidden, greedy = main_pass(input_ids.new_tensor([[token, draft]]))
        stats.drafted += 1
        if greedy[0] == draft:
            stats.accepted += 1
            committed = [draft, greedy[1]]
        else:
            cache.crop(-1)  # drop the rejected draft's entry
            committed, hidden = [greedy[0]], hidden[:, :1]
        for i, t in enumerate(committed):
            if t in eos or produced + i + 1 >= max_new_tokens:
                yield committed[: i + 1]
                return
        yield committed
        produced += len(committed)
        draft = drafter.draft(hidden, input_ids.new_tensor([committed]), start=position)
        token, position = committed[-1], position + len(committed)


def mtp_greedy_generate(
    model: DeepSeekForCausalLM,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
) -> tuple[torch.LongTensor, DraftStats]:
    """Like `model.generate(input_ids, do_sample=False)` for one sequence: returns prompt + new ids, and stats."""
    stats = DraftStats()
    new = [t for chunk in mtp_speculative_stream(model, input_ids, max_new_tokens, eos_token_id, stats) for t in chunk]
    return torch.cat([input_ids, input_ids.new_tensor([new])], dim=1), stats


__all__ = ["DraftStats", "mtp_greedy_generate", "mtp_speculative_stream"]
