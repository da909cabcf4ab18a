"""MTP self-speculative greedy decoding on the device: `generate(mtp_speculative=True)`'s fast path.

One speculative step is one compiled function (one CUDA graph on a GPU) over fixed buffers: the main model verifies
[newest token, draft] (two tokens per row) against the static latent cache, the argmax and the acceptance are
computed on the device, the first MTP module writes its entries for the same two cache slots and drafts the next
token from the newest kept one, and the cache is rewound past a rejected draft by setting every layer's length
index (a device tensor), never by reallocating. Rows that keep different numbers of tokens share the rectangular
cache: a draft one row rejected while another kept its own stays a hole that the mask `keep` hides, and each row
carries its own RoPE position. The host reads the device only to decide when to stop: after as many steps as the
fewest tokens still owed could take at full acceptance (at most `CHECK_EVERY` with an end-of-sequence token), so
a generation costs a handful of synchronisations, not several per step as the eager loop in
`modeling/speculative.py` does (input checks, MoE row counts, the acceptance read back per pass, a DynamicCache that
grows and is cropped). Greedy gives plain greedy `generate()`'s tokens; sampling and deeper drafts stay eager.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from ..modeling.latent_cache import LatentStaticCache
from .fast_generate import CHECK_EVERY, compiled_for_generate

VERIFIED = 2  # tokens per row in a verify pass: the newest committed token and one draft


@dataclass
class SpeculativeBuffers:
    """The speculative loop's state for B rows over a latent cache of `max_len` slots, each at a fixed address."""

    cache: LatentStaticCache  # the main layers' and the MTP modules' latent caches, slot for slot
    token: torch.Tensor  # [B] the newest committed token, not yet in the cache
    draft: torch.Tensor  # [B] the MTP module's guess at the token after it
    position: torch.Tensor  # [B] RoPE position of `token` (rows differ once they keep different numbers of drafts)
    length: torch.Tensor  # [] cache slots in use: every layer's length index after a step
    keep: torch.Tensor  # [B, max_len] bool: slots that hold a committed token (not padding, not a rejected draft)
    new_tokens: torch.Tensor  # [B, width] committed tokens, row by row
    produced: torch.Tensor  # [B] tokens committed so far
    unfinished: torch.Tensor  # [B] bool: no end-of-sequence token committed yet
    max_new: torch.Tensor  # [] the token budget (a tensor: one graph serves every budget)
    eos: torch.Tensor  # [E] end-of-sequence ids, -1 for none (a fixed buffer: one graph with or without eos)
    counts: torch.Tensor  # [3] over rows still going: drafts proposed, drafts kept, passes with any such row
    going: torch.Tensor  # [] bool: some row still owes tokens

    @classmethod
    def allocate(cls, model, batch: int, max_len: int, width: int, eos: int, device) -> "SpeculativeBuffers":
        def buffer(*shape, dtype=torch.long):
            tensor = torch.zeros(shape, dtype=dtype, device=device)
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs replay over these very tensors
            return tensor

        return cls(
            cache=LatentStaticCache(model.config, max_cache_len=max_len), token=buffer(batch), draft=buffer(batch),
            position=buffer(batch), length=buffer(), keep=buffer(batch, max_len, dtype=torch.bool),
            new_tokens=buffer(batch, width), produced=buffer(batch), unfinished=buffer(batch, dtype=torch.bool),
            max_new=buffer(), eos=buffer(eos), counts=buffer(3), going=buffer(dtype=torch.bool),
        )  # fmt: skip

    def fits(self, batch: int, max_len: int, width: int, eos: int, device) -> bool:
        shapes = (self.keep.shape, self.new_tokens.shape[1], self.eos.shape[0])
        return shapes == ((batch, max_len), width, eos) and self.keep.device == device


def fast_speculative_reason(model, config: GenerationConfig, draft_tokens: int | None) -> str | None:
    """Why this speculative call cannot take the device loop (None: it can)."""
    if config.do_sample:
        return "sampling (do_sample=True)"
    count = draft_tokens if draft_tokens is not None else model.config.num_nextn_predict_layers
    if count != 1:
        return f"{count} drafts per step (the device loop drafts one; pass mtp_draft_tokens=1)"
    if (config.num_return_sequences or 1) > 1:
        return "num_return_sequences > 1"
    if config.cache_implementation not in (None, "static"):
        return f"cache_implementation={config.cache_implementation!r}"
    return None


# On by default on CUDA: on an H200 the compiled loop gave plain greedy's tokens at batch 1 and 8 and 1.87x / 1.41x
# plain generate()'s speed (docs/PERF.md, MTP speculative decoding)
DEFAULT_ON_CUDA = True


def wants_fast_speculative(model, config: GenerationConfig, draft_tokens: int | None, requested: bool | None) -> bool:
    """The device loop by default (once DEFAULT_ON_CUDA) on CUDA in eval mode unless compilation is disabled; with
    `fast_loop=True` (uncompiled on a CPU, as `generate()`'s own device loop). Raises if asked for and impossible."""
    if requested is False:
        return False
    reason = fast_speculative_reason(model, config, draft_tokens)
    if requested:
        if reason:
            raise ValueError(f"generate(mtp_speculative=True, fast_loop=True) does not support {reason}.")
        return True
    on_cuda = model.device.type == "cuda" and not config.disable_compile and not model.training
    return DEFAULT_ON_CUDA and reason is None and on_cuda


def speculative_step(model, b: SpeculativeBuffers) -> None:
    """Verify [token, draft] per row, keep the draft where it is the main model's argmax, draft the next token."""
    backbone, head = model.model, model.lm_head
    offsets = torch.arange(VERIFIED, device=b.keep.device)
    slots = b.length + offsets  # [2]: the cache slots this pass writes, in the main layers and the MTP module
    b.keep.index_fill_(1, slots, True)
    causal = torch.arange(b.keep.shape[1], device=b.keep.device)[None, :] <= slots[:, None]  # [2, L]
    mask = b.keep[:, None, None, :] & causal[None, None]  # [B, 1, 2, L]
    positions = b.position[:, None] + offsets  # [B, 2]
    ids = torch.stack([b.token, b.draft], dim=1)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, cache=b.cache, use_cache=True,
                      return_dict=True).last_hidden_state  # [B, 2, d], normed  # fmt: skip
    target = head(hidden).argmax(dim=-1)  # [B, 2]: the main model's token after each
    kept = (b.draft == target[:, 0]).long()  # [B]: drafts kept (0 or 1); the committed tokens are target[:, :1+kept]

    # the MTP module's entries for the same two slots: slot j reads (h_j, the token after j), i.e. target[:, j]
    embeds = backbone.embed_tokens(target)
    mtp = backbone.mtp_layers[0]
    _, normed = mtp.forward_mtp(embeds, hidden, backbone.rotary_emb(embeds, positions), mask, cache=b.cache)
    newest = normed.gather(1, kept.view(-1, 1, 1).expand(-1, 1, normed.shape[-1]))[:, 0]  # the newest kept slot
    draft = head(newest).argmax(dim=-1)

    going = b.unfinished & (b.produced < b.max_new)
    b.counts.add_(torch.stack([going.sum(), (kept * going).sum(), going.any().long()]))
    width = b.new_tokens.shape[1]
    b.new_tokens.scatter_(1, (b.produced[:, None] + offsets).clamp(max=width - 1), target)  # past 1+kept: rewritten
    ends = (torch.isin(target, b.eos) & (offsets <= kept[:, None])).any(dim=1)
    b.unfinished.logical_and_(~ends)
    b.produced.add_(1 + kept)
    b.keep.index_copy_(1, slots[1:], offsets[1:] <= kept[:, None])  # a rejected draft's slot becomes a hole
    b.token.copy_(target.gather(1, kept[:, None])[:, 0])
    b.draft.copy_(draft)
    b.position.add_(1 + kept)
    b.going.copy_((b.unfinished & (b.produced < b.max_new)).any())
    b.length.add_(1 + kept.max())  # rewind past the drafts every row rejected
    for layer in b.cache.layers:
        layer.cumulative_length.copy_(b.length)


def compiled_speculative_step(model, config: GenerationConfig) -> Callable:
    return compiled_for_generate(model, speculative_step, config, "_fast_speculative_step")


def buffers_for(model, batch: int, prompt_len: int, max_new: int, eos: int, device) -> SpeculativeBuffers:
    """The model's buffers, reused while they fit and never shrunk (the compiled step keeps its shapes). Every step
    commits at least one token per row and takes at most two slots, so 2 * (max_new - 1) slots follow the prompt."""
    max_len = prompt_len + VERIFIED * max(max_new - 1, 1)
    width = max_new + VERIFIED
    previous = model.__dict__.get("_fast_speculative_sizes", (0, 0, 4))
    sizes = (max(max_len, previous[0]), max(width, previous[1]), max(eos, previous[2]))
    model.__dict__["_fast_speculative_sizes"] = sizes
    buffers = model.__dict__.get("_fast_speculative_buffers")
    if buffers is None or not buffers.fits(batch, *sizes, device):
        model.__dict__["_fast_speculative_buffers"] = buffers = None  # free the old cache first
        buffers = SpeculativeBuffers.allocate(model, batch, *sizes, device)
        model.__dict__["_fast_speculative_buffers"] = buffers
    return buffers


def prefill(model, b: SpeculativeBuffers, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Uncompiled, as `generate()`'s: the prompt into the main and MTP caches, the first token and the first draft."""
    backbone, head = model.model, model.lm_head
    batch, prompt_len = input_ids.shape
    hidden = backbone(input_ids=input_ids, attention_mask=mask, cache=b.cache, use_cache=True,
                      return_dict=True).last_hidden_state  # [B, T, d], normed  # fmt: skip
    token = head(hidden[:, -1]).argmax(dim=-1)
    embeds = backbone.embed_tokens(torch.cat([input_ids[:, 1:], token[:, None]], dim=1))  # token t+1 at t
    positions = torch.arange(prompt_len, device=input_ids.device)[None].expand(batch, -1)
    mtp_mask, position_embeddings, _ = backbone.attention_inputs(embeds, mask, positions, None)
    _, normed = backbone.mtp_layers[0].forward_mtp(embeds, hidden, position_embeddings, mtp_mask, cache=b.cache)
    b.token.copy_(token)
    b.draft.copy_(head(normed[:, -1]).argmax(dim=-1))
    b.position.fill_(prompt_len)
    b.length.fill_(prompt_len)
    b.new_tokens[:, 0] = token
    b.produced.fill_(1)
    b.unfinished.copy_(~torch.isin(token, b.eos))
    b.going.copy_(b.unfinished.any())


def run_watching(run: Callable[[int], None], b: SpeculativeBuffers, steps_left: int, lag: int = 2) -> None:
    """CUDA: up to `steps_left` steps, stopping once no row is going, as seen `lag` steps late. After each step
    the flag `going` is copied to pinned host memory behind an event; before step s the host waits for step
    s - lag's event only, so the GPU always has steps queued (no bubble) and at most `lag` steps run past the end."""
    flags = torch.zeros(lag, dtype=torch.bool, pin_memory=True)
    events = [torch.cuda.Event() for _ in range(lag)]
    for index in range(steps_left):
        slot = index % lag
        if index >= lag:
            events[slot].synchronize()
            if not bool(flags[slot]):
                return
        run(1)
        flags[slot].copy_(b.going, non_blocking=True)
        events[slot].record()


class SpeculativeStepError(RuntimeError):
    """The compiled speculative step failed (compilation, CUDA graphs, a kernel): raised from the original error."""


@torch.no_grad()
def fast_speculative_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new: int,
    eos_ids: list[int],
    pad: int,
    config: GenerationConfig,
) -> tuple[torch.Tensor, dict]:
    """Greedy tokens [B, T + new] as plain greedy `generate()` returns them (rows that end early padded with `pad`),
    and the draft statistics `DeepSeekForCausalLM.last_speculative_stats` holds."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    if not bool(mask[:, -1].all()):
        raise ValueError("MTP speculative decoding needs left padding: every row's last token must be unmasked")
    b = buffers_for(model, batch, prompt_len, max_new, len(eos_ids), device)
    b.cache.reset()
    b.cache.unpadded = False  # two query tokens per pass: FlashMLA's one-token kernel never serves this loop
    b.keep.zero_()
    b.keep[:, :prompt_len] = mask.bool()
    b.new_tokens.fill_(pad)
    b.max_new.fill_(max_new)
    b.eos.fill_(-1)
    b.eos[: len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.long)
    b.counts.zero_()
    prefill(model, b, input_ids, mask)

    step = compiled_speculative_step(model, config)

    def run(step_count: int) -> None:
        try:
            for _ in range(step_count):
                step(model, b)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            raise SpeculativeStepError(str(error)) from error

    steps_left, least_produced = max_new - 1, 1  # each step commits at least one token per row
    while steps_left > 0:
        # as many steps as the fewest tokens still owed could take if every draft were kept, then one read
        burst = min(steps_left, -(-(max_new - least_produced) // VERIFIED))
        if eos_ids and device.type == "cuda":  # rows may end any time: watch them without stalling the queue
            run_watching(run, b, steps_left)
            break
        if eos_ids:
            burst = min(burst, CHECK_EVERY)
        run(burst)
        steps_left -= burst
        least_produced, any_going = torch.stack([b.produced.min(), b.going.long()]).tolist()
        if not any_going:
            break

    new = b.new_tokens[:, :max_new]
    lengths = torch.full((batch,), max_new, device=device)
    if eos_ids:  # cut each row after its first end-of-sequence token; the batch as long as its longest row
        is_eos = torch.isin(new, b.eos)
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, lengths)
        new = torch.where(torch.arange(max_new, device=device) < lengths[:, None], new, pad)
    drafted, accepted, passes = b.counts.tolist()
    width, committed = int(lengths.max()), int(lengths.sum())
    stats = {
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_step": committed / (drafted + batch),  # row passes: one per drafted token, and the prefill's
        "draft_tokens": drafted,
        "accepted": accepted,
        "steps": passes + 1,
    }
    return torch.cat([input_ids, new[:, :width].to(input_ids.dtype)], dim=1), stats


__all__ = [
    "fast_speculative_generate", "speculative_step", "wants_fast_speculative", "fast_speculative_reason",
    "SpeculativeStepError",
]  # fmt: skip
