"""Expert-parallel models to and from the usual Hugging Face checkpoint folder (`save_pretrained` layout: per-expert
tensors in safetensors), whatever the parallel layout that trains or serves them.

    model = load_expert_parallel(path, group)   # this rank reads only its own experts from the safetensors
    state = full_state_dict(model)              # collective: whole tensors on rank 0 (None elsewhere)
    save_expert_parallel(model, path)           # collective: rank 0 writes the folder one process loads

`load_expert_parallel` builds the model on the meta device, replaces the routed experts by this rank's share and
fills every tensor from the files, so a model whose experts do not fit one device fits across the group. FSDP2's
shards (DTensors) are gathered whole on save; an expert tensor is concatenated from the ranks of its group.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from ..configuration import DeepSeekConfig
from ..modeling.attention import RotaryEmbedding
from ..modeling.model import DeepSeekForCausalLM
from ..modeling.moe import TopKRouter
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel


def expert_parameters(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Name of every expert-parallel parameter of `model` -> the module that holds it."""
    return {
        f"{name}.{weight}": module
        for name, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for weight in ("gate_up_proj", "down_proj")
    }


def whole_tensor(tensor: torch.Tensor, experts: ExpertParallelExperts | None = None) -> torch.Tensor:
    """Collective: an FSDP2 shard (DTensor) gathered whole, an expert share concatenated over its group's ranks,
    anything else as it is."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor if experts is None else experts.whole(tensor)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective over the model's groups: the whole state dict on the CPU on global rank 0, None on the others."""
    experts = expert_parameters(model)
    keep = not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = whole_tensor(tensor.detach(), experts.get(name))
        if keep:
            state[name] = tensor.cpu().clone()
    return state if keep else None


def save_expert_parallel(model: DeepSeekForCausalLM, path: str | Path, tokenizer=None) -> None:
    """Collective: write `path` as `save_pretrained` does for one process (and the tokenizer, if given)."""
    state = full_state_dict(model)
    if state is not None:
        model.save_pretrained(path, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()


class SafetensorsFolder:
    """Reads single tensors of a checkpoint folder (`model.safetensors` or an index of shards) without loading the
    rest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(self.path / file, framework="pt")
        return self._open[file].get_tensor(name)


def _expert_share(folder: SafetensorsFolder, name: str, module: ExpertParallelExperts) -> torch.Tensor:
    """This rank's experts of `name` (`<prefix>.gate_up_proj` or `.down_proj`), stacked from the per-expert tensors."""
    prefix, _, weight = name.rpartition(".")
    experts = range(*module.expert_range)
    if weight == "down_proj":
        return torch.stack([folder.get(f"{prefix}.{e}.down_proj.weight") for e in experts])
    return torch.stack(
        [torch.cat([folder.get(f"{prefix}.{e}.{p}_proj.weight") for p in ("gate", "up")]) for e in experts]
    )


def load_expert_parallel(
    path: str | Path,
    group: dist.ProcessGroup | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> DeepSeekForCausalLM:
    """A saved model (the `save_pretrained` folder) with the routed experts split over `group` (default: every
    rank): each rank reads the non-expert tensors and only its own experts. `dtype` defaults to the config's
    (float32 if it names none); the routers stay in float32 as `from_pretrained` keeps them. In eval mode."""
    config = DeepSeekConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        raise ValueError(
            f"{path} holds FP8 weights; load_expert_parallel reads bf16/fp32 checkpoints (dequantise it first)"
        )
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if config.n_routed_experts % world:
        raise ValueError(
            f"{config.n_routed_experts} routed experts cannot be split evenly over {world} expert-parallel ranks"
        )
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config)
    apply_expert_parallel(model, group)
    device = torch.device(device or "cpu")
    model.to_empty(device=device)
    folder = SafetensorsFolder(path)
    experts = expert_parameters(model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in experts:
                value = _expert_share(folder, name, experts[name])
            elif name == "lm_head.weight" and config.tie_word_embeddings and name not in folder:
                continue
            else:
                value = folder.get(name)
            tensor.copy_(value)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.float()
        if isinstance(module, RotaryEmbedding):  # buffers no checkpoint holds: recomputed (fp32) from the config
            fresh = RotaryEmbedding(config)
            module.inv_freq, module.original_inv_freq = fresh.inv_freq.to(device), fresh.original_inv_freq.to(device)
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
