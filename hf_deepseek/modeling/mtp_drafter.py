"""The MTP modules as an incremental drafter for speculative decoding (`speculative.py`), over their own latent cache.

Depth k's entry at position t reads (h^{k-1}_t, embedding of token t+k) and predicts token t+k+1, as in training
(h^0 = the main model's final normed hidden state). It sits in the slot of the main cache that holds position
t+k-1, so every depth shares the main cache's slots and holes; a row's first k-1 positions have no depth-k entry.
Drafting D tokens chains the depths at the newest position: depth k also reads the drafts of depths 1..k-1, in k-1
provisional entries that are dropped once the drafts are made.
"""

import torch
from transformers.cache_utils import DynamicCache


def causal_keep_mask(slots: torch.Tensor, query_length: int) -> torch.Tensor:
    """[B, 1, T, S] bool: the T newest slots each see the valid (`slots` [B, S] == 1) slots up to themselves."""
    total = slots.shape[1]
    causal = torch.ones(query_length, total, dtype=torch.bool, device=slots.device).tril(total - query_length)
    return causal[None, None] & slots.bool()[:, None, None, :]


class MTPDrafter:
    """Drafts `depths` tokens per row from the first `depths` MTP modules. `chooser.choose(logits)` picks each
    draft (argmax, or a sample) and returns its distribution (None when greedy)."""

    def __init__(self, model, chooser, depths: int = 1):
        if not 1 <= depths <= model.config.num_nextn_predict_layers:
            raise ValueError(
                f"can draft 1 to {model.config.num_nextn_predict_layers} tokens per step (one per MTP module), "
                f"not {depths}"
            )
        self.model, self.chooser, self.depths = model, chooser, depths
        self.layers = model.model.mtp_layers[:depths]
        self.cache = DynamicCache()  # grows layers lazily, so the MTP layers' indices (num_hidden_layers + k) fit
        self.positions: torch.Tensor | None = None  # [B, S]: the main position of every slot
        self.carry: list[torch.Tensor] = []  # per depth < D: its output at each row's newest valid slot [B, d]

    def _entries(self, depth: int, hidden, next_ids, position_ids, mask, prefill: bool):
        """Runs depth `depth` over new entries: hidden [B, T, d] (h^{depth-1}), next_ids [B, T], position_ids [B, T]
        (entry positions). Returns (outputs to chain the next depth, normed outputs for the head)."""
        backbone = self.model.model
        embeds = backbone.embed_tokens(next_ids)
        if prefill:  # no past: the attention interface with transformers' causal mask (from the 2-D slot mask)
            mask, position_embeddings, _ = backbone.attention_inputs(embeds, mask, position_ids, None)
        else:
            position_embeddings = backbone.rotary_emb(embeds, position_ids)
        return self.layers[depth - 1].forward_mtp(embeds, hidden, position_embeddings, mask, cache=self.cache)

    def _depth_slots(self, slots: torch.Tensor, depth: int) -> torch.Tensor:
        """The main cache's slot mask, less the slots of a row's first depth-1 positions (no entry at that depth)."""
        return slots if depth == 1 else slots * (self.positions >= depth - 1)

    def _draft(self, real, normed, next_ids, slots, position_ids, last, prefill: bool):
        """Drafts from this step's real entries of every depth: `real`/`normed` are depth 1's outputs [B, T, d];
        deeper depths are run here. Returns drafts [B, D] and their distributions [B, D, V] (None if greedy)."""
        rows = torch.arange(real.shape[0], device=real.device)
        draft, dist = self.chooser.choose(self.model.lm_head(normed[rows, last]))
        drafts, dists, provisional = [draft], [dist], None
        newest = position_ids[rows, last]  # [B]: position of the newest valid slot; the newest token is one further
        previous_real = real
        for depth in range(2, self.depths + 1):
            carry = self.carry[depth - 2]
            shifted = torch.cat([carry[:, None], previous_real[:, :-1]], dim=1)  # h^{depth-1} one position back
            depth_slots = self._depth_slots(slots, depth)
            entries = (position_ids - (depth - 1)).clamp(min=0)
            mask = depth_slots if prefill else causal_keep_mask(depth_slots, real.shape[1])
            out, _ = self._entries(depth, shifted, next_ids, entries, mask, prefill)
            # provisional entries at the newest positions, reading the drafts of the depths above
            chained = previous_real[rows, last][:, None]
            if provisional is not None:
                chained = torch.cat([chained, provisional], dim=1)  # [B, depth-1, d]
            tokens = torch.stack(drafts, dim=1)  # [B, depth-1]
            spots = newest[:, None] + 2 - depth + torch.arange(depth - 1, device=real.device)
            provisional_slots = torch.cat([depth_slots, depth_slots.new_ones(real.shape[0], depth - 1)], dim=1)
            provisional, provisional_normed = self._entries(
                depth, chained, tokens, spots, causal_keep_mask(provisional_slots, depth - 1), False
            )
            draft, dist = self.chooser.choose(self.model.lm_head(provisional_normed[:, -1]))
            drafts.append(draft)
            dists.append(dist)
            self.cache.layers[self.layers[depth - 1].self_attn.layer_idx].crop(-(depth - 1))
            self.carry[depth - 2] = previous_real[rows, last]
            previous_real = out
        drafts = torch.stack(drafts, dim=1)
        return drafts, (torch.stack(dists, dim=1) if dists[0] is not None else None)

    def prefill(self, hidden, next_ids, attention_mask, position_ids):
        """hidden [B, T, d]: the prompt's h_t; next_ids [B, T]: token t+1 of each (left padding allowed). Drafts
        from each row's last position: drafts [B, D] and their distributions (None if greedy)."""
        self.positions = position_ids
        self.carry = [hidden.new_zeros(hidden.shape[0], hidden.shape[2]) for _ in range(self.depths - 1)]
        real, normed = self._entries(1, hidden, next_ids, position_ids, attention_mask, prefill=True)
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        return self._draft(real, normed, next_ids, attention_mask, position_ids, last, prefill=True)

    def step(self, hidden, next_ids, slots, position_ids, last):
        """Entries for the main cache's newest slots: hidden, next_ids, position_ids [B, k]; `slots` [B, S] includes
        them (a hole where invalid). Each row drafts from its entry `last` [B]. Returns drafts [B, D] and their
        distributions [B, D, V] (None if greedy)."""
        self.positions = torch.cat([self.positions, position_ids], dim=1)
        mask = causal_keep_mask(slots, next_ids.shape[1])
        real, normed = self._entries(1, hidden, next_ids, position_ids, mask, prefill=False)
        return self._draft(real, normed, next_ids, slots, position_ids, last, prefill=False)

    def crop(self, slots: int) -> None:
        """Drops the newest `slots` slots, as the main cache did (only the MTP layers' entries: the layers below
        were never filled, and transformers 5.17 cannot crop an empty layer)."""
        for layer in self.layers:
            self.cache.layers[layer.self_attn.layer_idx].crop(-slots)
        self.positions = self.positions[:, :-slots]

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only `rows` of the batch (rows that ended leave it)."""
        self.cache.batch_select_indices(rows)
        self.positions = self.positions[rows]
        self.carry = [carry[rows] for carry in self.carry]
