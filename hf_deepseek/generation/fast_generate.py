"""`generate()`'s token loop on the device: the decode step, the logits processing, the token choice and the
end-of-sequence bookkeeping in one compiled function, the host asking whether every row has ended only once every
`CHECK_EVERY` tokens. On a GPU that function is captured by hand in CUDA graphs of one and of `CHECK_EVERY` steps
(`step_graphs`), so the host calls one replay per `CHECK_EVERY` tokens.

transformers' own loop spends host time on every token (growing input and mask tensors, the processors, a
stopping check that reads a device value); at batch 1 that cost about 1.1 ms a token on an H200 (issue 17). Here
every per-token tensor is a fixed buffer at a fixed address: the new tokens, the padding mask over the static
latent cache, the step counter, which rows have ended. The prefill and the first token run uncompiled, as in
transformers; a long batch is prefilled in groups of rows of at most `PREFILL_TOKENS` tokens (a longer prompt in
chunks, or `prefill_chunk_size` tokens a row) straight into the latent cache, so its memory grows with the cache,
not with batch x prompt.
Greedy decoding gives transformers' tokens; sampling applies transformers' own warpers (temperature, top-k, top-p,
min-p) and draws from the same distribution with the exponential race (argmax of p / Exp(1), what gpt-fast and
vLLM use inside CUDA graphs), not with `torch.multinomial`'s draws. Anything else `generate()` offers (beams,
scores, streamers, other processors, stopping strings) goes to transformers' loop.
"""

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging

from ..modeling.compile_regions import decode_compile_config
from ..modeling.decode_linear import use_decode_linears
from .step_graphs import StepGraphs, chunks, tensors_key, warm_up

CHECK_EVERY = 8  # decode steps between the host's checks that some row is still going (one sync each)
# CUDA with generate()'s default compile mode: the step compiled without Inductor's CUDA graphs and captured by hand,
# CHECK_EVERY steps a graph (`step_graphs`); HF_DEEPSEEK_HAND_GRAPHS=0: Inductor's CUDA graphs, a step a call
HAND_GRAPHS = os.environ.get("HF_DEEPSEEK_HAND_GRAPHS", "1") != "0"
PREFILL_TOKENS = 32768  # tokens one prefill forward takes: whole prompts in groups of rows; longer prompts in chunks
logger = logging.get_logger(__name__)

# generation settings this loop does not implement: each must be None, its neutral value or GenerationConfig()'s
NEUTRAL_SETTINGS = dict(
    num_beams=1, num_beam_groups=1, num_return_sequences=1, diversity_penalty=0.0, repetition_penalty=1.0,
    encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, guidance_scale=1.0,
    typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, return_dict_in_generate=False, output_scores=False,
    output_logits=False, output_attentions=False, output_hidden_states=False, remove_invalid_values=False,
    renormalize_logits=False, low_memory=False, token_healing=False,
)  # fmt: skip
UNSUPPORTED_SETTINGS = (
    "num_beams", "num_beam_groups", "num_return_sequences", "penalty_alpha", "diversity_penalty", "dola_layers",
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "force_words_ids", "constraints", "sequence_bias", "guidance_scale", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "renormalize_logits",
    "stop_strings", "max_time", "watermarking_config", "prompt_lookup_num_tokens", "assistant_early_exit",
    "low_memory", "token_healing",
)  # fmt: skip
# generate() arguments other than the prompt and its mask that only transformers' loop handles
UNSUPPORTED_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
    "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "inputs_embeds",
    "position_ids", "cache", "past_key_values", "tokenizer", "assistant_tokenizer",
)  # fmt: skip


@dataclass
class TokenChoice:
    """How a step's logits become a token, all on the device: transformers' processors for these settings."""

    do_sample: bool
    warpers: list[Callable]  # transformers' warpers, in its order (sampling only)
    eos: torch.Tensor | None  # [n] end-of-sequence ids
    pad: int
    min_length: int  # eos suppressed while the sequence (prompt included) is shorter
    min_new_tokens: int  # eos suppressed while fewer new tokens were generated

    @classmethod
    def from_config(cls, config: GenerationConfig, device) -> "TokenChoice":
        eos_ids = end_of_sequence_ids(config)
        eos = torch.tensor(eos_ids, device=device) if eos_ids else None
        pad = config.pad_token_id
        if pad is None and eos_ids:
            pad = eos_ids[0]  # as transformers does, which warns about it
        warpers = []
        if config.do_sample:
            if config.temperature is not None and config.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None and config.top_k != 0:
                warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
            if config.top_p is not None and config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
            if config.min_p is not None:
                warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
        return cls(
            do_sample=bool(config.do_sample), warpers=warpers, eos=eos, pad=0 if pad is None else int(pad),
            min_length=config.min_length or 0, min_new_tokens=config.min_new_tokens or 0,
        )  # fmt: skip

    def signature(self) -> tuple:
        """What a graph that captured this choice baked in (the warpers' settings, the eos ids' values)."""
        warpers = tuple((type(w).__name__, repr(sorted(vars(w).items()))) for w in self.warpers)
        eos = None if self.eos is None else tuple(self.eos.tolist())
        return (self.do_sample, warpers, eos, self.pad, self.min_length, self.min_new_tokens)

    def __call__(self, logits: torch.Tensor, prompt_len: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (fp32) -> tokens [B]; `prompt_len` and `new_tokens` (tokens generated so far) are device
        scalars, so one compiled graph serves every step and prompt length."""
        scores = logits
        if self.eos is not None and (self.min_length > 0 or self.min_new_tokens > 0):
            short = (prompt_len + new_tokens < self.min_length) | (new_tokens < self.min_new_tokens)
            is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.eos)
            scores = torch.where(short & is_eos, float("-inf"), scores)
        if not self.do_sample:
            return scores.argmax(dim=-1)
        for warper in self.warpers:
            scores = warper(None, scores)
        probs = scores.softmax(dim=-1)
        # the exponential race: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i, without a sync
        return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


def fast_loop_reason(model, config: GenerationConfig, model_kwargs: dict) -> str | None:
    """Why this call cannot take the device loop (None: it can)."""
    defaults = GenerationConfig()
    for name in UNSUPPORTED_SETTINGS:
        value = getattr(config, name, None)
        if value not in (None, NEUTRAL_SETTINGS.get(name), getattr(defaults, name, None)):
            return f"{name}={value!r}"
    for name in UNSUPPORTED_ARGUMENTS:
        if model_kwargs.get(name) is not None:
            return f"the {name} argument"
    extra = set(model_kwargs) - {"attention_mask", "input_ids", "use_cache", *UNSUPPORTED_ARGUMENTS}
    if extra:
        return f"model arguments {sorted(extra)}"
    if config.use_cache is False:
        return "use_cache=False"
    if config.cache_implementation not in (None, "static"):
        return f"cache_implementation={config.cache_implementation!r}"
    if getattr(config, "is_assistant", False):
        return "assisted generation"
    return None


def wants_fast_loop(model, config: GenerationConfig, model_kwargs: dict, requested: bool | None) -> bool:
    """The loop's default: on CUDA, where `generate()` takes the static latent cache and compiles its step
    (`latent_cache.LatentCacheGenerationMixin`); anywhere with `fast_loop=True`. Raises if asked for and impossible."""
    if requested is False:
        return False
    reason = fast_loop_reason(model, config, model_kwargs)
    if requested:
        if reason:
            raise ValueError(f"generate(fast_loop=True) does not support {reason}; leave fast_loop unset.")
        return True
    if reason or model.device.type != "cuda" or config.disable_compile:
        return False
    return config.cache_implementation == "static" or (config.cache_implementation is None and not model.training)


@dataclass
class DecodeBuffers:
    """The loop's state for B rows over a latent cache of `max_len` tokens, each tensor at a fixed address."""

    cache: object  # LatentStaticCache
    next_input: torch.Tensor  # [B, 1] the token the next step feeds
    keep: torch.Tensor  # [B, max_len] bool: cache positions a query may attend to (padding mask, written ones)
    new_tokens: torch.Tensor  # [B, max_len] the generated tokens
    prompt_len: torch.Tensor  # [] the prompt's length (cache positions)
    step: torch.Tensor  # [] tokens generated so far
    unfinished: torch.Tensor  # [B] bool
    ended_at: torch.Tensor  # [B] the index of each row's end-of-sequence token (max_len while none)
    graphs: StepGraphs | None = None  # the step captured over these buffers (CUDA, `HAND_GRAPHS`)

    @classmethod
    def allocate(cls, model, batch: int, max_len: int, device) -> "DecodeBuffers":
        def buffer(*shape, dtype=torch.long):
            tensor = torch.zeros(shape, dtype=dtype, device=device)
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs replay over these very tensors
            return tensor

        cache = model._prepare_static_cache("static", batch, max_len)
        return cls(
            cache=cache, next_input=buffer(batch, 1), keep=buffer(batch, max_len, dtype=torch.bool),
            new_tokens=buffer(batch, max_len), prompt_len=buffer(), step=buffer(),
            unfinished=buffer(batch, dtype=torch.bool), ended_at=buffer(batch),
        )  # fmt: skip

    def fits(self, batch: int, max_len: int, device) -> bool:
        return self.keep.shape == (batch, max_len) and self.keep.device == device


def record_token(buffers: DecodeBuffers, choice: TokenChoice, token: torch.Tensor) -> None:
    """Store the token chosen at `step` (pad for rows that have ended), mark rows that end, advance the step."""
    b = buffers
    if choice.eos is not None:
        token = torch.where(b.unfinished, token, choice.pad)
    b.new_tokens.index_copy_(1, b.step.view(1), token[:, None])
    b.next_input.copy_(token[:, None])
    if choice.eos is not None:
        ends = b.unfinished & torch.isin(token, choice.eos)
        b.ended_at.copy_(torch.where(ends, b.step, b.ended_at))
        b.unfinished.logical_and_(~ends)
    b.step.add_(1)


def decode_step(model, buffers: DecodeBuffers, choice: TokenChoice) -> None:
    """One token per row: feed `next_input` at cache position prompt_len + step - 1, choose and record the next."""
    b = buffers
    position = (b.prompt_len + b.step - 1).view(1)
    b.keep.index_fill_(1, position, True)
    out = model(input_ids=b.next_input, attention_mask=b.keep[:, None, None, :], cache=b.cache, use_cache=True,
                logits_to_keep=1)  # fmt: skip
    logits = out.logits[:, -1].float()
    record_token(b, choice, choice(logits, b.prompt_len, b.step))


def compiled_for_generate(
    model, step: Callable, config: GenerationConfig, cache_name: str, compile_config: CompileConfig | None = None
) -> Callable:
    """`step` compiled with the model's generate compile settings (Inductor + CUDA graphs) or `compile_config`, once
    per model and compile config (kept in `model.<cache_name>`); uncompiled where transformers would not compile
    (CPU without `_compile_all_devices`)."""
    compile_config = compile_config or config.compile_config or model._default_compile_config()
    on_accelerator = model.device.type in ("cuda", "xpu")
    if config.disable_compile or not (on_accelerator or getattr(compile_config, "_compile_all_devices", False)):
        return step
    use_decode_linears(model)  # a no-op with HF_DEEPSEEK_LINEAR_GEMV=0
    cached = model.__dict__.get(cache_name)
    if cached is None or cached[0] != compile_config:
        settings = decode_compile_config(model, compile_config).to_dict()  # FP8 layers: cuBLAS GEMMs
        cached = (compile_config, torch.compile(step, **settings))
        model.__dict__[cache_name] = cached
    return cached[1]


def compiled_decode_step(model, config: GenerationConfig, compile_config: CompileConfig | None = None) -> Callable:
    return compiled_for_generate(model, decode_step, config, "_fast_decode_step", compile_config)


def hand_graphed_config(model, config: GenerationConfig) -> CompileConfig | None:
    """generate()'s compile config without Inductor's CUDA graphs where the loop captures its own: on CUDA, with
    `HAND_GRAPHS` on and transformers' default mode ("reduce-overhead" with Inductor and no options of the
    caller's); None otherwise (the caller's settings, as they are)."""
    compile_config = config.compile_config or model._default_compile_config()
    if (
        not HAND_GRAPHS
        or model.device.type != "cuda"
        or config.disable_compile
        or "hand_graphs_error" in model.__dict__
    ):
        return None
    if compile_config.backend != "inductor" or compile_config.mode != "reduce-overhead" or compile_config.options:
        return None
    return dataclasses.replace(compile_config, mode="default")


def graph_key(model, buffers: DecodeBuffers, choice: TokenChoice, step: Callable) -> tuple:
    """What graphs of `step` over the buffers capture: the token choice, the padding, the training mode, the
    compiled step and the weights' addresses; the buffers' graphs serve a call whose key is theirs."""
    return (choice.signature(), buffers.cache.unpadded, model.training, id(step), tensors_key(model))


def capture_step_graphs(model, buffers: DecodeBuffers, choice: TokenChoice, step: Callable, key) -> StepGraphs | None:
    """Graphs of 1 and CHECK_EVERY calls of `step` over the buffers, kept with them under `key` (`graph_key`);
    `step` must have run once since it was compiled. Where capture fails the cause is kept in
    `model.hand_graphs_error` and warned about, and None returned: this call goes on a step at a time, later ones
    with Inductor's CUDA graphs."""
    buffers.graphs = None  # the old graphs' memory first
    try:
        graphs = StepGraphs(lambda: step(model, buffers, choice), (1, CHECK_EVERY), key, keep=(step, choice))
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        model.__dict__["hand_graphs_error"] = f"{type(error).__name__}: {str(error)[:500]}"
        logger.warning(f"generate(): capturing the decode step in CUDA graphs failed ({model.hand_graphs_error}); "
                       "this model's device loop uses Inductor's CUDA graphs from now on.")  # fmt: skip
        return None
    buffers.graphs = graphs
    return graphs


def end_of_sequence_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def default_attention_mask(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """transformers' inference of the mask when none is given: padding where pad tokens appear, unless pad is eos."""
    pad = config.pad_token_id
    if pad is None or pad in end_of_sequence_ids(config) or not bool((input_ids == pad).any()):
        return torch.ones_like(input_ids)
    return input_ids.ne(pad).long()


class DecodeStepError(RuntimeError):
    """The compiled decode step failed (compilation, CUDA graphs, a kernel): raised from the original error."""


def try_fast_generate(model, inputs, generation_config, kwargs: dict, requested: bool | None) -> torch.Tensor | None:
    """The device loop's tokens, or None where transformers' loop should run instead: the call needs more than the
    loop offers, or (unless `requested`) its compiled step failed on this model, now or before. Such a failure (not
    running out of memory) is remembered in `model.fast_loop_error` and warned about; transformers' loop takes over."""
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    if not wants_fast_loop(model, config, model_kwargs, requested):
        return None
    if requested is None and model.__dict__.get("fast_loop_error"):
        return None
    input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
    if input_ids is None or input_ids.dim() != 2 or new_token_budget(config, input_ids.shape[1]) < 1:
        return None  # transformers' own checks and messages
    try:
        return fast_generate(model, input_ids, config, model_kwargs)
    except DecodeStepError as error:
        if requested:
            raise error.__cause__ from None
        remember_failure(model, error, "fast_loop_error", "_fast_decode_buffers")
        logger.warning(
            f"generate(): the device token loop failed ({model.fast_loop_error}); this model uses transformers' "
            "loop from now on. Please report it; generate(fast_loop=True) raises the error instead."
        )
        return None


def remember_failure(model, error: RuntimeError, error_name: str, buffers_name: str) -> None:
    """A device loop's compiled step failed: note its cause on the model under `error_name` (later calls skip the
    loop) and free the loop's buffers."""
    cause = error.__cause__
    model.__dict__[error_name] = f"{type(cause).__name__}: {str(cause)[:500]}"
    model.__dict__.pop(buffers_name, None)


def new_token_budget(config: GenerationConfig, prompt_len: int) -> int:
    return config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, cache, chunk_size: int | None) -> torch.Tensor:
    """Write the prompts to the empty latent `cache`; return the last position's logits [B, V] (fp32).

    With `chunk_size` (the caller's `prefill_chunk_size`) the whole batch goes in chunks of that many tokens a row.
    Otherwise whole prompts go in groups of rows, `PREFILL_TOKENS` tokens a forward, each group through a view of its
    rows of the cache: every group is a fresh prefill, whose attention is the expanded path over its own tokens
    (flash attention on a GPU), rather than absorbed attention over the cache, which would score each query against
    all 576 latent dimensions of every earlier token. A prompt longer than `PREFILL_TOKENS` goes alone, in chunks."""
    batch, prompt_len = input_ids.shape
    if chunk_size:
        groups, chunk = [(0, batch)], chunk_size
    else:
        rows = max(1, PREFILL_TOKENS // prompt_len)
        groups, chunk = [(r, min(batch, r + rows)) for r in range(0, batch, rows)], PREFILL_TOKENS
    if len(groups) > 1:
        cache.allocate(batch, model.config, model.get_input_embeddings().weight.dtype, input_ids.device)
    last = None
    for first, end_row in groups:
        view = cache if len(groups) == 1 else cache.row_view(first, end_row)
        for start in range(0, prompt_len, chunk):  # later chunks attend to the cache the earlier ones wrote
            end = min(prompt_len, start + chunk)
            out = model(input_ids=input_ids[first:end_row, start:end], attention_mask=mask[first:end_row, :end],
                        cache=view, use_cache=True, logits_to_keep=1)  # fmt: skip
        logits = out.logits[:, -1].float()
        del out
        if len(groups) == 1:
            return logits
        if last is None:
            last = logits.new_empty(batch, logits.shape[-1])
        last[first:end_row] = logits
    cache.set_length(prompt_len)
    return last


@torch.no_grad()
def fast_generate(model, input_ids: torch.Tensor, config: GenerationConfig, model_kwargs: dict) -> torch.Tensor:
    """Greedy or sampled tokens [B, T + new] as `generate()` returns them (rows that end early padded with pad)."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    mask = model_kwargs.get("attention_mask")
    mask = default_attention_mask(input_ids, config) if mask is None else mask
    max_new = new_token_budget(config, prompt_len)
    if max_new < 1:
        raise ValueError(f"generate would add {max_new} tokens to a {prompt_len}-token prompt; raise max_new_tokens.")
    max_len = prompt_len + max_new - 1  # the last token is never fed back
    choice = TokenChoice.from_config(config, device)
    buffers = model.__dict__.get("_fast_decode_buffers")
    cache_len = max(max_len, getattr(model, "_previous_max_cache_length", -1))  # never shrink: shapes stay
    if buffers is None or not buffers.fits(batch, cache_len, device):
        model.__dict__["_fast_decode_buffers"] = buffers = None  # free the old cache first
        buffers = DecodeBuffers.allocate(model, batch, cache_len, device)
        model.__dict__["_fast_decode_buffers"] = buffers
    b = buffers
    b.cache.reset()
    b.cache.unpadded = bool(mask.all())  # no left padding: decode attention may take FlashMLA's kernel
    b.keep.zero_()
    b.keep[:, :prompt_len] = mask.bool()
    b.new_tokens.fill_(choice.pad)
    b.prompt_len.fill_(prompt_len)
    b.step.zero_()
    b.unfinished.fill_(True)
    b.ended_at.fill_(b.new_tokens.shape[1])

    last_logits = prefill(model, input_ids, mask, b.cache, config.prefill_chunk_size)
    record_token(b, choice, choice(last_logits, b.prompt_len, b.step))
    del last_logits
    hand = hand_graphed_config(model, config)  # None: Inductor's CUDA graphs, or none (CPU)
    step = compiled_decode_step(model, config, hand)
    graphs = None
    if hand is None:
        b.graphs = None  # an earlier call's, unused: their memory back
    can_end_from = max(choice.min_new_tokens, choice.min_length - prompt_len, 0)  # no eos before: nothing to check
    checked, done = 0, 1  # when the host last checked; tokens chosen so far (the prefill chose the first)
    # the graphs' side stream, captures and replays on the inputs' GPU, whichever device is current
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        while done < max_new:
            if choice.eos is not None and done > can_end_from and done - checked >= CHECK_EVERY:
                checked = done
                if not bool(b.unfinished.any()):
                    break
            try:
                if hand is not None and graphs is None:
                    key = graph_key(model, b, choice, step)
                    graphs = b.graphs if b.graphs is not None and b.graphs.key == key else None
                    if graphs is None:  # the step's first run (compilation) is the next token, then it is captured
                        warm_up(lambda: step(model, b, choice))
                        done += 1
                        graphs = capture_step_graphs(model, b, choice, step, key)
                        if graphs is None:  # capture failed: this call goes on a step at a time
                            hand = None
                        continue
                if graphs is not None:
                    n = chunks(max_new - done, graphs.sizes)
                    graphs.replay(n)
                    done += n
                else:
                    step(model, b, choice)
                    done += 1
            except torch.OutOfMemoryError:
                raise
            except Exception as error:
                raise DecodeStepError(str(error)) from error
    generated = max_new
    if choice.eos is not None:  # transformers stops once every row has ended: same length
        generated = min(max_new, int(b.ended_at.max()) + 1)
    return torch.cat([input_ids, b.new_tokens[:, :generated].to(input_ids.dtype)], dim=1)


__all__ = [
    "fast_generate", "try_fast_generate", "DecodeStepError", "wants_fast_loop", "fast_loop_reason", "TokenChoice",
    "decode_step", "CHECK_EVERY", "prefill",
]  # fmt: skip
