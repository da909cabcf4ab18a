"""The static latent cache: the fast decode path's memory, and the hook that makes `generate()` use it.

Per layer one pre-allocated buffer [B, max_len, kv_lora_rank + qk_rope_head_dim] holds, for every token, the
normalised kv latent followed by the roped key: the 576 values MLA needs (DeepSeek-V3), nothing per head. The
buffer never moves and the write position is a device tensor, so a decode step has static shapes and no host
synchronisation: transformers' `generate` compiles it (`torch.compile`, mode "reduce-overhead": CUDA graphs) as it
does for its own `StaticCache`. `mla_decode.py` attends over the buffer.

On CUDA `generate()` uses this cache by default in eval mode; `cache_implementation="dynamic"` (or
`disable_compile=True` to keep the cache but skip compilation) opts out, `cache_implementation="static"` opts in
anywhere (CPU included, uncompiled there). Models with FP8 weights take the same path, compiled one graph per
shape (`_default_compile_config`).
"""

import os

import torch
from transformers.cache_utils import Cache, StaticLayer
from transformers.generation.configuration_utils import CompileConfig
from transformers.utils import is_torchdynamo_compiling

from ..kernels import flash_mla_decode, mla_decode_triton
from ..kernels.flash_mla_decode import PAGE

DECODE_ATTENTION: str | None = None  # overrides HF_DEEPSEEK_DECODE_ATTENTION (the decode benchmark, per row)
DECODE_ATTENTION_CHOICES = ("flash", "triton", "torch", "auto")
# "auto": the Triton kernel up to this batch, FlashMLA above (one layer on an H200 at 2k context: Triton 20 / 28 us
# at batch 1 / 8 against FlashMLA's 25 / 30, FlashMLA 43 us at 32 against 66; docs/PERF.md, 2026-12-04h)
AUTO_TRITON_MAX_BATCH = 8


def decode_attention(batch_size: int | None = None) -> str:
    """The decode attention backend for caches of `batch_size` rows allocated now: "auto" (the default, resolved
    here: "triton" up to `AUTO_TRITON_MAX_BATCH` rows, else "flash"), "flash" (FlashMLA where usable, else torch),
    "triton" (`kernels/mla_decode_triton.py` where Triton and CUDA exist, else as "flash") or "torch". At batch 1 /
    2k the bench's step took 1.03 ms with the Triton kernel against 1.13 with FlashMLA (H200, 2026-12-05)."""
    choice = DECODE_ATTENTION or os.environ.get("HF_DEEPSEEK_DECODE_ATTENTION", "auto")
    if choice not in DECODE_ATTENTION_CHOICES:
        raise ValueError(f"HF_DEEPSEEK_DECODE_ATTENTION={choice!r}: expected one of {DECODE_ATTENTION_CHOICES}")
    if choice == "auto":
        return "triton" if batch_size is not None and batch_size <= AUTO_TRITON_MAX_BATCH else "flash"
    return choice


class LatentCacheLayer(StaticLayer):
    """One layer's latent cache. `keys` [B, 1, L, r] and `values` [B, 1, L, rope] are views of one buffer
    `latent_and_rope` [B, L, r + rope], so attention can score against both with one matmul. Each row's storage
    is rounded up to whole pages of `PAGE` tokens (`storage` [B, L64, r + rope]), which FlashMLA's decode kernel
    reads when `flash_mla` (decided once, here, outside traced code: `kernels/flash_mla_decode.py`)."""

    flash_mla: bool = False
    triton_attention: bool = False  # one query token per row through `kernels/mla_decode_triton.py` instead

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        if self.num_heads != 1:
            raise ValueError(f"LatentCacheLayer holds one shared latent per token, got {self.num_heads} heads.")
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        paged_len = -(-self.max_cache_len // PAGE) * PAGE
        width = self.k_head_dim + self.v_head_dim
        self._use_storage(torch.zeros(self.batch_size, paged_len, width, dtype=self.dtype, device=self.device))
        compiling = is_torchdynamo_compiling()
        choice, dims = decode_attention(self.batch_size), (self.k_head_dim, self.v_head_dim, self.dtype, self.device)
        self.triton_attention = not compiling and choice == "triton" and mla_decode_triton.usable(*dims)
        self.flash_mla = not compiling and choice != "torch" and not self.triton_attention
        self.flash_mla = self.flash_mla and flash_mla_decode.usable(*dims)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not is_torchdynamo_compiling():  # fixed addresses: CUDA graphs replay over these very tensors
            for tensor in (self.storage, self.latent_and_rope, self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def _use_storage(self, storage: torch.Tensor) -> None:
        """Hold `storage` [B, L64, r + rope] and the views of it that attention and transformers read."""
        self.storage = storage
        self.latent_and_rope = storage[:, : self.max_cache_len]
        self.keys = self.latent_and_rope[:, None, :, : self.k_head_dim]
        self.values = self.latent_and_rope[:, None, :, self.k_head_dim :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens at the current length (a device tensor: no sync); return the full views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[-2]
        positions = torch.arange(new_tokens, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(new_tokens)
        rows = torch.cat([key_states[:, 0], value_states[:, 0]], dim=-1).to(self.dtype)  # [B, T, r + rope]
        self.storage.index_copy_(1, positions, rows)
        written = self.buffer()
        return written[:, None, :, : self.k_head_dim], written[:, None, :, self.k_head_dim :]

    def buffer(self) -> torch.Tensor:
        """[B, max_len, r + rope], a view of `storage` taken where it is used: compiled code must read and write
        the cache through the one tensor `storage`, because two graph inputs that alias each other, one of them
        written, make Inductor give up CUDA graphs ("skipping cudagraphs due to mutated inputs")."""
        return self.storage[:, : self.max_cache_len]

    def row_view(self, start: int, end: int) -> "LatentCacheLayer":
        """A layer over rows start..end of this one's storage (written through, shared memory) with its own length,
        starting at 0: a group of rows prefilled on its own (`LatentStaticCache.row_view`)."""
        view = LatentCacheLayer(max_cache_len=self.max_cache_len)
        view.device, view.dtype, view.flash_mla = self.device, self.dtype, self.flash_mla
        view.triton_attention = self.triton_attention
        view.batch_size, view.num_heads = end - start, self.num_heads
        view.k_head_dim, view.v_head_dim = self.k_head_dim, self.v_head_dim
        view._use_storage(self.storage[start:end])
        view.cumulative_length = torch.zeros_like(self.cumulative_length)
        view.is_initialized = True
        return view

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the rows in place, so the buffer keeps its address and `keys`/`values` stay views."""
        if self.is_initialized:
            reordered = self.storage.index_select(0, beam_idx.to(self.device))
            self.storage.copy_(reordered)


class LatentStaticCache(Cache):
    """A compileable cache of `max_cache_len` latent tokens per layer (the main layers and the MTP layers).
    `unpadded`: every row's tokens fill cache positions [0, length) (no left padding), which lets decode attention
    take kernels without a padding mask (FlashMLA); whoever fills the cache and knows it sets it."""

    unpadded: bool = False
    flash_schedule: tuple[torch.Tensor, torch.Tensor] | None = None  # FlashMLA's, left by a forward's first layer

    def __init__(self, config, max_cache_len: int, **kwargs):
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be at least 1, got {max_cache_len}.")
        layers = config.num_hidden_layers + getattr(config, "num_nextn_predict_layers", 0)
        super().__init__(layers=[LatentCacheLayer(max_cache_len=max_cache_len) for _ in range(layers)])

    def allocate(self, batch: int, config, dtype: torch.dtype, device) -> None:
        """Allocate every layer's buffer now (they are otherwise allocated by the first write)."""
        latent = torch.empty(batch, 1, 0, config.kv_lora_rank, dtype=dtype, device=device)
        rope = torch.empty(batch, 1, 0, config.qk_rope_head_dim, dtype=dtype, device=device)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(latent, rope)

    def row_view(self, start: int, end: int) -> "LatentStaticCache":
        """A cache over rows start..end of this one's (allocated) buffers, empty: a forward through it writes
        those rows from position 0 as a fresh prefill would, so the group attends over its own tokens with the
        expanded path. The caller sets this cache's lengths afterwards (`set_length`)."""
        view = LatentStaticCache.__new__(LatentStaticCache)
        Cache.__init__(view, layers=[layer.row_view(start, end) for layer in self.layers])
        return view

    def set_length(self, length: int) -> None:
        """Every layer holds `length` tokens (in place: compiled steps hold these tensors)."""
        for layer in self.layers:
            layer.cumulative_length.fill_(length)

    def layer_length(self, layer_idx: int) -> torch.Tensor | int:
        """Tokens written so far in `layer_idx`: a device tensor once allocated (read it on the host only outside
        compiled code), 0 before."""
        return self.layers[layer_idx].get_seq_length()


def host_seq_length(cache: Cache | None) -> int | None:
    """The cached length as a Python int for input checks; None inside a compiled graph, where reading a static
    cache's device-side length would break the graph and synchronise."""
    if cache is None:
        return 0
    length = cache.get_seq_length()
    if isinstance(length, torch.Tensor):
        return None if is_torchdynamo_compiling() else int(length)
    return length


class LatentCacheGenerationMixin:
    """`generate()` hooks (mixed into `DeepSeekForCausalLM`): "static" caches are `LatentStaticCache`s, the default
    on CUDA in eval mode, and the compiled decode step may change shapes without recompiling each time."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if (
            generation_config.cache_implementation is None
            and user_cache is None
            and generation_config.use_cache is not False
            and self.device.type == "cuda"
            and not self.training
        ):
            generation_config.cache_implementation = "static"  # generate's own copy of the config
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _prepare_static_cache(self, cache_implementation: str, batch_size: int, max_cache_len: int, *args, **kwargs):
        if cache_implementation != "static":  # offloaded variants: transformers' own
            return super()._prepare_static_cache(cache_implementation, batch_size, max_cache_len, *args, **kwargs)
        # never shrink: a cache as long as any earlier call's keeps the compiled step's shapes (as transformers does)
        max_cache_len = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = max_cache_len
        return LatentStaticCache(self.config, max_cache_len=max_cache_len)

    def _default_compile_config(self) -> CompileConfig:
        """Inductor + CUDA graphs, with automatic dynamic shapes: a new batch size or cache length recompiles once
        into a shape-generic graph instead of once per shape (transformers' default is `dynamic=False`). Except
        with FP8 weights: their Triton kernels failed to trace under symbolic shapes (H200, torch 2.11), so each
        shape gets its own graph."""
        return CompileConfig(dynamic=False if self.has_fp8_weights() else None)

    def has_fp8_weights(self) -> bool:
        from .fp8 import FP8InferenceExperts, FP8InferenceLinear

        return any(isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)) for m in self.modules())


__all__ = ["LatentCacheLayer", "LatentStaticCache", "LatentCacheGenerationMixin", "host_seq_length"]
