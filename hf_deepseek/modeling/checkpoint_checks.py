"""Checks a local checkpoint against its config before any weight is loaded, and writes checkpoints atomically.

`check_checkpoint` reads only the safetensors headers (and, for `check_finite`, the tensors one at a time): every
file complete, every tensor the config implies present with its shape and a float dtype, every FP8 weight with a
`weight_scale_inv` of the 128x128-block grid, no NaN or inf. Each problem raises `CheckpointError` naming the file,
the tensor and what was expected. Pickle files (`pytorch_model.bin`) are refused unless the caller asks for them
with `use_safetensors=False`. `atomic_save` writes into a temporary sibling directory and moves the files into
place only once all are written, so an interrupted save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
BLOCK = 128
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file, the tensor and the expectation."""


@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: str
    shape: tuple[int, ...]


def read_header(path: str) -> dict[str, StoredTensor]:
    """The tensors a safetensors file declares, after checking that the file holds every byte they need."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated download?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: the header declares {header_len} bytes but the file has {size} (truncated or not safetensors)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    tensors = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: tensor '{key}' needs bytes {start}..{end} of the data but the file holds only {data_bytes} "
                f"(the file is truncated: re-download or re-save {name})"
            )
        tensors[key] = StoredTensor(path, info["dtype"], tuple(info["shape"]))
    return tensors


def stored_tensors(directory: str) -> dict[str, StoredTensor]:
    """Every tensor of a local safetensors checkpoint (one file or sharded with an index), by name."""
    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
        tensors: dict[str, StoredTensor] = {}
        for file in sorted(set(weight_map.values())):
            path = os.path.join(directory, file)
            if not os.path.isfile(path):
                names = [k for k, v in weight_map.items() if v == file]
                raise CheckpointError(
                    f"{path}: missing; the index places {len(names)} tensors there, e.g. {names[0]!r}"
                )
            tensors.update(read_header(path))
        for key, file in weight_map.items():
            if key not in tensors:
                raise CheckpointError(f"{os.path.join(directory, file)}: lacks tensor '{key}' that {SAFE_INDEX} lists")
        return tensors
    return read_header(os.path.join(directory, SAFE_SINGLE))


def expected_shapes(model_cls: type[nn.Module], config) -> dict[str, tuple[int, ...]]:
    """The official-layout tensor names and shapes the config implies (experts per expert), built on `meta`."""
    expected = {}
    for key, shape in in_memory_shapes(model_cls, config).items():
        if key.endswith("mlp.experts.gate_up_proj"):
            base, (experts, two_inter, hidden) = key[: -len("gate_up_proj")], shape
            for e in range(experts):
                expected[f"{base}{e}.gate_proj.weight"] = (two_inter // 2, hidden)
                expected[f"{base}{e}.up_proj.weight"] = (two_inter // 2, hidden)
        elif key.endswith("mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(shape[0]):
                expected[f"{base}{e}.down_proj.weight"] = shape[1:]
        else:
            expected[key] = shape
    return expected


def in_memory_shapes(model_cls: type[nn.Module], config) -> dict[str, tuple[int, ...]]:
    """The model's own state-dict names and shapes (stacked experts), built on `meta`."""
    with torch.device("meta"):
        model = model_cls(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def _stored_layout(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, StoredTensor], model_cls: type[nn.Module], config
) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """`expected` adapted to how the checkpoint was written, and the names it may lack (newly initialised on load,
    as transformers does). Two variants besides the official layout: stacked experts (`save_pretrained(...,
    save_original_format=False)` writes the in-memory names), and a checkpoint of the base model alone (saved from
    `DeepSeekModel`: no `model.` prefix, no output head)."""
    optional: set[str] = set()
    prefix = getattr(model_cls, "base_model_prefix", "") + "."
    if prefix != "." and not any(k.startswith(prefix) for k in tensors) and any(k.startswith(prefix) for k in expected):
        optional = {k for k in expected if not k.startswith(prefix)}
        expected = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in expected.items()}
        stacked = {k[len(prefix) :]: v for k, v in in_memory_shapes(model_cls, config).items() if k.startswith(prefix)}
    else:
        stacked = in_memory_shapes(model_cls, config)
    for key, shape in stacked.items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) and key in tensors:
            base = key[: key.rindex(".") + 1]
            names = ("gate_proj", "up_proj") if key.endswith("gate_up_proj") else ("down_proj",)
            for e in range(shape[0]):
                for name in names:
                    expected.pop(f"{base}{e}.{name}.weight", None)
            expected[key] = shape
    return expected, optional


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _config_fields_hint(config) -> str:
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts", "kv_lora_rank", "q_lora_rank")
    return ", ".join(f"{f}={getattr(config, f, None)}" for f in fields)


def check_checkpoint(
    directory: str, config, model_cls: type[nn.Module], fp8: bool = False, check_finite: bool = True
) -> None:
    """Raise `CheckpointError` for anything in `directory` that would load wrongly or not at all (see module doc).

    `fp8`: the config declares DeepSeek's block-scaled FP8 (e4m3 weights with float32 `weight_scale_inv`).
    """
    tensors = stored_tensors(directory)
    expected, optional = _stored_layout(expected_shapes(model_cls, config), tensors, model_cls, config)
    if getattr(config, "tie_word_embeddings", False):
        optional.add("lm_head.weight")
    if getattr(config, "topk_method", "noaux_tc") != "noaux_tc":  # DeepSeek-V2 routers have no correction bias
        optional |= {k for k in expected if k.endswith("e_score_correction_bias")}
    base = "model." if any(k.startswith("model.") for k in expected) else ""
    for k in range(getattr(config, "num_nextn_predict_layers", 0)):  # transformers' own layout drops MTP layers
        prefix = f"{base}layers.{config.num_hidden_layers + k}."
        mtp_keys = {key for key in expected if key.startswith(prefix)}
        if not any(key in tensors for key in mtp_keys):
            optional |= mtp_keys

    missing = [k for k in expected if k not in tensors and k not in optional]
    if missing:
        where = SAFE_INDEX if os.path.isfile(os.path.join(directory, SAFE_INDEX)) else SAFE_SINGLE
        raise CheckpointError(
            f"{os.path.join(directory, where)}: lacks {len(missing)} tensor(s) that config.json implies, e.g. "
            f"'{missing[0]}' of shape {_fmt(expected[missing[0]])}"
            + (f" (also {missing[1:4]})" if len(missing) > 1 else "")
        )
    wrong_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k]]
    if wrong_shape:
        key = wrong_shape[0]
        stored = tensors[key]
        disagree = (
            f"; {len(wrong_shape)} tensors differ, so config.json ({_config_fields_hint(config)}) probably does not "
            "belong to these weights"
            if len(wrong_shape) > 1
            else ""
        )
        raise CheckpointError(
            f"{stored.file}: tensor '{key}' has shape {_fmt(stored.shape)}, but config.json implies "
            f"{_fmt(expected[key])}{disagree}"
        )
    for key in expected:
        if key not in tensors:
            continue
        stored = tensors[key]
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith(".weight") else None
        if stored.dtype in FP8_DTYPES:
            if not fp8:
                raise CheckpointError(
                    f"{stored.file}: tensor '{key}' is {stored.dtype} but config.json has no FP8 quantization_config"
                )
            _check_scale(tensors, key, scale_key, stored)
        elif stored.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{stored.file}: tensor '{key}' has dtype {stored.dtype}; expected a float dtype "
                f"({', '.join(sorted(FLOAT_DTYPES | (FP8_DTYPES if fp8 else set())))})"
            )
    if check_finite:
        check_finite_values(tensors)


def _check_scale(tensors: dict[str, StoredTensor], key: str, scale_key: str | None, weight: StoredTensor) -> None:
    out_features, in_features = weight.shape
    grid = (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
    scale = tensors.get(scale_key) if scale_key else None
    if scale is None:
        raise CheckpointError(
            f"{weight.file}: FP8 tensor '{key}' has no '{scale_key}' (float32 of shape {_fmt(grid)}, one scale per "
            f"{BLOCK}x{BLOCK} block)"
        )
    if scale.shape != grid or scale.dtype != "F32":
        raise CheckpointError(
            f"{scale.file}: tensor '{scale_key}' is {scale.dtype} {_fmt(scale.shape)}; FP8 weight '{key}' of shape "
            f"{_fmt(weight.shape)} needs float32 {_fmt(grid)} (one scale per {BLOCK}x{BLOCK} block)"
        )


def check_finite_values(tensors: dict[str, StoredTensor]) -> None:
    """Raise naming the first tensor that holds NaN or inf (reads each file once, one tensor at a time)."""
    by_file: dict[str, list[str]] = {}
    for key, stored in tensors.items():
        by_file.setdefault(stored.file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point():
                    continue
                values = tensor.float() if tensor.element_size() == 1 else tensor
                finite = torch.isfinite(values)
                if not bool(finite.all()):
                    bad = (~finite).nonzero()[0].tolist()
                    raise CheckpointError(
                        f"{file}: tensor '{key}' holds {int((~finite).sum())} non-finite value(s) (NaN or inf), "
                        f"first at index {bad}; expected finite weights (a corrupted or diverged checkpoint)"
                    )


def refuse_pickle(directory: str) -> None:
    """A directory with pickle weights but no safetensors: refuse, as unpickling can run arbitrary code."""
    if os.path.isfile(os.path.join(directory, SAFE_SINGLE)) or os.path.isfile(os.path.join(directory, SAFE_INDEX)):
        return
    found = [f for f in PICKLE_FILES if os.path.isfile(os.path.join(directory, f))]
    if found:
        raise CheckpointError(
            f"{os.path.join(directory, found[0])}: only pickle weights here, and unpickling can execute code. "
            "Convert them to safetensors, or pass use_safetensors=False if you trust the file."
        )


def verify_local_checkpoint(path, kwargs: dict, model_cls: type[nn.Module], fp8: bool) -> None:
    """The checks `DeepSeekForCausalLM.from_pretrained` runs on a local directory (hub ids are left to the hub)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return
    directory = os.path.join(path, kwargs.get("subfolder") or "")
    if kwargs.get("use_safetensors") is False:
        return  # the caller asked for pickle weights explicitly
    refuse_pickle(directory)
    if not os.path.isfile(os.path.join(directory, SAFE_SINGLE)) and not os.path.isfile(
        os.path.join(directory, SAFE_INDEX)
    ):
        return  # transformers names what is missing
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        config = model_cls.config_class.from_pretrained(config or directory)
    check_checkpoint(directory, config, model_cls, fp8=fp8, check_finite=kwargs.get("check_finite", True))


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory beside `save_directory`; on success move its files into `save_directory`
    (weights first, `config.json` last, each with an atomic rename) and drop weight files the new save does not
    use. On failure `save_directory` is untouched and the temporary directory is removed."""
    target = os.path.abspath(os.fspath(save_directory))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=parent)
    try:
        yield tmp
        os.makedirs(target, exist_ok=True)
        new = sorted(os.listdir(tmp), key=lambda f: (f == "config.json", f.endswith(".json"), f))
        for name in new:
            os.replace(os.path.join(tmp, name), os.path.join(target, name))
        for name in os.listdir(target):
            if _WEIGHT_FILE.fullmatch(name) and name not in new:
                os.remove(os.path.join(target, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_save(save: Callable[[str], object], save_directory: str | os.PathLike) -> object:
    """Run `save(tmp_directory)` and publish its files into `save_directory` only once it returns."""
    with atomic_directory(save_directory) as tmp:
        return save(tmp)


__all__ = ["CheckpointError", "atomic_save", "check_checkpoint", "verify_local_checkpoint", "read_header"]
