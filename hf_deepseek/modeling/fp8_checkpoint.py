"""DeepSeek's official FP8 checkpoints: float8_e4m3fn weights with float32 `weight_scale_inv` of shape
[ceil(out/128), ceil(in/128)], config `quantization_config = {quant_method: fp8, fmt: e4m3, activation_scheme:
dynamic, weight_block_size: [128, 128]}`.

`DeepSeekForCausalLM.from_pretrained` hands such checkpoints to `load_fp8_pretrained` instead of transformers'
FineGrainedFP8 quantizer, which does not know this model's stacked experts and, on CPU, dequantises with a block
size derived from the scale grid (wrong for partial blocks: it rejects a [576, 7168] weight with a [5, 56] grid
and mis-scales a [136, 160] one with a [2, 2] grid). Here the weights stay FP8 on a GPU (block-scaled GEMMs) and
are dequantised exactly, each partial block with its own scale, elsewhere. Saving is the model's own
`save_pretrained` once its layers are FP8 (`convert_to_fp8_inference`), or `save_fp8_pretrained` from a model
in high precision.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GenerationConfig
from transformers import initialization as init

from .fp8 import (
    OFFICIAL_QUANTIZATION_CONFIG,
    FP8InferenceExperts,
    FP8InferenceLinear,
    FP8Recipe,
    FP8RoutedExperts,
    convert_to_fp8_inference,
    dequantize_fp8_model,
)
from .moe import RoutedExperts

logger = logging.getLogger(__name__)

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
IGNORED_KWARGS = ("low_cpu_mem_usage", "trust_remote_code", "use_safetensors", "weights_only", "_from_auto")


def _quantization_config(config) -> dict | None:
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    return quant


def is_official_fp8(quant: dict | None) -> bool:
    return bool(quant) and quant.get("quant_method") == "fp8" and list(quant.get("weight_block_size", [])) == [128, 128]


def _local_dir(path: str | os.PathLike, hub: dict) -> str:
    if os.path.isdir(path):
        return os.path.join(path, hub.get("subfolder") or "")
    from huggingface_hub import snapshot_download

    hub = {
        k: v for k, v in hub.items() if k in ("cache_dir", "force_download", "local_files_only", "token", "revision")
    }
    return snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"], **hub)


def wants_fp8_loader(path: str | os.PathLike | None, kwargs: dict) -> bool:
    """True when `from_pretrained(path, **kwargs)` targets an official FP8 checkpoint and no other quantisation."""
    requested = kwargs.get("quantization_config")
    if path is None or (
        requested is not None and not is_official_fp8({"weight_block_size": [128, 128], **_as_dict(requested)})
    ):
        return False
    config = kwargs.get("config")
    if config is not None and not isinstance(config, (str, os.PathLike)):
        return is_official_fp8(_quantization_config(config))
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    try:
        if os.path.isdir(path):
            config_file = os.path.join(path, hub.get("subfolder") or "", "config.json")
        else:
            from transformers.utils import cached_file

            config_file = cached_file(str(path), "config.json", **hub)
        with open(config_file) as f:
            return is_official_fp8(json.load(f).get("quantization_config"))
    except (OSError, ValueError, TypeError):
        return False


def _as_dict(quant) -> dict:
    return dict(quant) if isinstance(quant, dict) else quant.to_dict()


def _device_from_map(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, dict):
        devices = {str(v) for v in device_map.values()}
        if len(devices) != 1:
            raise NotImplementedError(f"FP8 checkpoints load onto one device; got a device_map spanning {devices}.")
        device_map = devices.pop()
    if isinstance(device_map, int) or (isinstance(device_map, str) and device_map.isdigit()):
        return torch.device("cuda", int(device_map))
    return torch.device(device_map)


def read_checkpoint(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (sharded with an index, or one file), on CPU."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    return state


def uses_pow2_scales(quant: dict | None) -> bool:
    """`scale_fmt: ue8m0` (DeepSeek-V3.1): every scale is a power of two, the weights' and the activations'."""
    return bool(quant) and quant.get("scale_fmt") == "ue8m0"


def _fp8_recipe_for(model: nn.Module, keys: set[str]) -> FP8Recipe:
    """Modules the checkpoint ships in FP8 get converted (the output head too where it has scales, as
    `convert_to_fp8_inference(model, FP8Recipe(skip=()))` saves it); those without scales stay. With `scale_fmt:
    ue8m0` the layers quantise activations to power-of-two scales too, as DeepSeek-V3.1 does."""
    skip = []
    for name, module in model.named_modules():
        scale_key = {nn.Linear: f"{name}.weight_scale_inv", RoutedExperts: f"{name}.0.gate_proj.weight_scale_inv"}
        if type(module) in scale_key and scale_key[type(module)] not in keys:
            skip.append(name)
    return FP8Recipe(skip=tuple(skip), pow2_scales=uses_pow2_scales(_quantization_config(model.config)))


def _mtp_keys(model: nn.Module) -> set[str]:
    """State-dict names of the MTP modules (`model.layers.{num_hidden_layers + k}.`)."""
    config = model.config
    prefixes = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))
    return {k for k in model.state_dict() if k.startswith(prefixes)} if prefixes else set()


def _init_missing_mtp(model: nn.Module, missing: list[str]) -> list[str]:
    """A checkpoint without the MTP layer (every one transformers' DeepseekV3 saves) loads as in bf16: the MTP
    modules are newly initialised. Returns what is still missing."""
    mtp = _mtp_keys(model)
    if not mtp or not mtp <= set(missing):
        return missing
    with torch.no_grad():
        for layer in model.model.mtp_layers:
            for module in layer.modules():
                model._init_weights(module)
    return [k for k in missing if k not in mtp]


def _report(model: nn.Module, path, initialised: set[str], unexpected: set[str]) -> None:
    """transformers' own load report (the table bf16 loading prints) for newly initialised and unused tensors."""
    from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

    info = LoadStateDictInfo(
        missing_keys=initialised, unexpected_keys=unexpected, mismatched_keys=set(), error_msgs=[],
        conversion_errors={}, skipped_pp_keys=set(),
    )  # fmt: skip
    log_state_dict_report(model, str(path), ignore_mismatched_sizes=False, loading_info=info, logger=logger)


def load_fp8_pretrained(cls, path: str | os.PathLike, *model_args, **kwargs):
    """Load an official FP8 checkpoint into `cls` (a DeepSeekForCausalLM class).

    Keyword arguments as for `from_pretrained`: `config`, `dtype` (of everything not FP8; "auto" reads the config),
    `device_map` (one device), `attn_implementation`, hub arguments, config overrides. `quantization_config=
    FineGrainedFP8Config(dequantize=...)` forces or forbids dequantisation; by default the weights stay FP8 on a
    CUDA device and are dequantised exactly elsewhere.
    """
    if model_args:
        raise TypeError("FP8 checkpoints take keyword arguments only.")
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    directory = _local_dir(path, hub)
    config = kwargs.pop("config", None)
    if config is None or isinstance(config, (str, os.PathLike)):
        config = cls.config_class.from_pretrained(config or directory)
    requested = kwargs.pop("quantization_config", None)
    dequantize = _as_dict(requested).get("dequantize") if requested is not None else None
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or "auto"
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = _device_from_map(kwargs.pop("device_map", None))
    build = {"attn_implementation": kwargs.pop("attn_implementation")} if "attn_implementation" in kwargs else {}
    for name in IGNORED_KWARGS:
        kwargs.pop(name, None)
    # the Auto classes pass hub options here, and `_adapter_model_path` when the directory holds a PEFT adapter
    if "_adapter_model_path" in (kwargs.pop("adapter_kwargs", None) or {}):
        raise NotImplementedError("FP8 checkpoints load without PEFT adapters; load the adapter afterwards.")
    for name, value in kwargs.items():
        if not hasattr(config, name):
            raise TypeError(f"Unexpected keyword argument {name!r} for an FP8 checkpoint.")
        setattr(config, name, value)
    if dequantize is None:
        dequantize = device.type != "cuda"

    state = read_checkpoint(directory)
    ignored = [re.compile(p) for p in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []]
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in ignored)}
    with init.no_init_weights():
        model = cls._from_config(config, dtype=dtype, **build)
    quant = _quantization_config(config)
    convert_to_fp8_inference(model, _fp8_recipe_for(model, set(state)), quantize=False)
    model.config.quantization_config = dict(quant)  # the checkpoint's own, `scale_fmt` included, for the next save
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    still_missing = _init_missing_mtp(model, missing)
    if still_missing:
        raise ValueError(f"The FP8 checkpoint at {path} lacks {len(still_missing)} tensors, e.g. {still_missing[:4]}.")
    if missing or unexpected:
        _report(model, path, set(missing), set(unexpected))
    if dequantize:
        dequantize_fp8_model(model, dtype)
    model.to(device)
    if os.path.exists(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def fp8_state_dict(model: nn.Module, recipe: FP8Recipe | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict in the official FP8 layout, quantised from its current (high-precision) weights:
    every linear layer but the output head as e4m3 + `weight_scale_inv`, routed experts per expert."""
    recipe = recipe or FP8Recipe()
    state = model.state_dict()
    for name, module in model.named_modules():
        prefix = f"{name}."
        if isinstance(module, nn.Linear) and not recipe.skips(name):
            fp8_module = FP8InferenceLinear.from_linear(module, recipe)
        elif type(module) in (RoutedExperts, FP8RoutedExperts) and not recipe.skips(name):
            fp8_module = FP8InferenceExperts.from_experts(module, model.config, recipe)
        else:
            continue
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update(fp8_module.state_dict(prefix=prefix))
    return state


def save_fp8_pretrained(model, save_directory: str | os.PathLike, recipe: FP8Recipe | None = None, **kwargs) -> None:
    """Write a high-precision model as an official FP8 checkpoint, leaving the model itself unchanged. With
    `recipe.pow2_scales` (or a config already declaring `scale_fmt: ue8m0`) every scale is a power of two and
    `quantization_config` says `scale_fmt: ue8m0`, as DeepSeek-V3.1's checkpoints do."""
    previous = getattr(model.config, "quantization_config", None)
    if recipe is None:
        recipe = FP8Recipe(pow2_scales=uses_pow2_scales(_quantization_config(model.config)))
    state = fp8_state_dict(model, recipe)
    quant = dict(OFFICIAL_QUANTIZATION_CONFIG)
    if recipe.pow2_scales:
        quant["scale_fmt"] = "ue8m0"
    model.config.quantization_config = quant
    try:
        model.save_pretrained(save_directory, state_dict=state, **kwargs)
    finally:
        model.config.quantization_config = previous


__all__ = ["load_fp8_pretrained", "save_fp8_pretrained", "fp8_state_dict", "read_checkpoint", "wants_fp8_loader"]
