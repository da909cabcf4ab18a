"""Regional torch.compile for training: each decoder layer (and the loss) compiled once, applied from outside.

Compiling the repeated block rather than the whole model keeps compile time to one graph per kind of layer
(dense, MoE): the layers share their code, so Dynamo reuses the graph with each layer's parameters as inputs.
Inside a layer Inductor fuses what eager mode runs as separate memory-bound kernels: the fp32 RMSNorms, the
interleaved RoPE and its concatenations, the sigmoid router's group-limited top-k, SwiGLU and the gate-weight
scaling; its partitioner recomputes those cheap elementwise results in backward instead of saving them (the
activation-memory choice DeepSeek-V3 makes by hand for its norms). The grouped expert GEMMs stay
`F.grouped_mm` and the attention core SDPA. The loss is compiled too, so the fp32 upcast of the
[tokens, vocab] logits is fused into the cross-entropy instead of written out.

A model with FP8 layers keeps its `torch._scaled_mm` calls on the kernels its backend probed (cuBLAS): Inductor
otherwise autotunes its own Triton scaled-mm templates against them at every FP8 GEMM shape, even without
max-autotune, and its blockwise template reads 1x128 scales row-major where `torch._scaled_mm` takes them
column-major, as the FP8 backend passes them (read in `torch/_inductor/kernel/mm.py` and its
`triton_main_loop_scaled_mm` template, torch 2.13; not yet seen to fire on the GPU).

Each call compiles its model's blocks in a region of their own. Dynamo keeps what it compiled, guards included, on
the code object it compiled, and `layer.compile()` compiles the code that every decoder layer of every model runs:
all models in a process then share one cache, whose size Dynamo caps per code object (`recompile_limit`, 8). A
process that compiles several models one after another (the training bench's variants) added each model's
graphs to it, one per kind of block, and FP8 recipes guard on their fields (`recipe.linear_wgrad`, ...): the
fourth variant of 2026-12-04 (rowwise with `linear_wgrad="bf16"`) hit the cap and ran its blocks eagerly, 1.5x
slower than plain rowwise. Here the blocks of one model are called through one small function whose code object is
that model's own copy, so its cache holds that model's graphs alone and goes with the model; its loss likewise
(`ForCausalLMLoss` is every model's, and each `torch.compile` call's backend a guard of its own).
"""

import dataclasses
import types
from functools import partial

import torch
from torch import nn


def _call_block(block: nn.Module, *args, **kwargs):
    """What a block's `__call__` runs (its hooks, then `forward`); traced whole, as `layer.compile()` traces it."""
    return block._call_impl(*args, **kwargs)


def _call_loss(loss_function, *args, **kwargs):
    """The model's loss function, traced whole (it is the same function, `ForCausalLMLoss`, in every model)."""
    return loss_function(*args, **kwargs)


def _own_copy(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own: Dynamo's compiled graphs and their guards, kept on the code object, then
    serve and count against this copy's callers only."""
    code = fn.__code__.replace()  # a new code object, equal to fn's
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# Inductor settings for models with FP8 layers: GEMM templates from ATen only (cuBLAS), none autotuned in Triton
FP8_INDUCTOR_OPTIONS = {"max_autotune_gemm_backends": "ATEN"}


def has_fp8_layers(model: nn.Module) -> bool:
    return any(hasattr(module, "fp8_recipe") for module in model.modules())


def decode_compile_config(model: nn.Module, compile_config):
    """generate()'s compile settings (a transformers CompileConfig) for `model`'s decode step: unchanged, but that a
    model with FP8 layers compiled by Inductor without options of its own gets `FP8_INDUCTOR_OPTIONS` too, beside
    its mode's options spelled out (torch.compile takes a mode or options, not both). Past the matrix-vector
    kernels' few rows its layers call `torch._scaled_mm`, against which Inductor can autotune Triton templates at
    every shape (see above): the suspected reason an FP8-weight decode step at batch 32 was still compiling after
    160 s on the H200 (2026-12-04), where batch 1 (matrix-vector kernels only) compiled in 11 s."""
    if compile_config.backend != "inductor" or compile_config.options is not None or not has_fp8_layers(model):
        return compile_config
    mode_options = torch._inductor.list_mode_options(compile_config.mode) if compile_config.mode else {}
    return dataclasses.replace(compile_config, mode=None, options={**mode_options, **FP8_INDUCTOR_OPTIONS})


def compile_for_training(model: nn.Module, loss: bool = True, **compile_options) -> nn.Module:
    """Compile, in place, every block of `model.model.layers` (decoder and MTP layers), in one region of this
    model's own (one graph per kind of block), and, with `loss`, the model's loss function. Returns the model.
    `compile_options` go to `torch.compile` (e.g. `mode=...`); with Inductor and neither `mode` nor `options`
    given, a model with FP8 layers gets `FP8_INDUCTOR_OPTIONS`."""
    backbone = getattr(model, "model", model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"compile_for_training needs a model with `.model.layers`, got {type(model).__name__}")
    inductor = compile_options.get("backend", "inductor") == "inductor"
    if inductor and has_fp8_layers(model) and not {"mode", "options"} & compile_options.keys():
        compile_options["options"] = dict(FP8_INDUCTOR_OPTIONS)
    region = torch.compile(_own_copy(_call_block), **compile_options)  # one region for the model's blocks
    for layer in layers:
        layer._compiled_call_impl = partial(region, layer)  # what `layer.compile()` sets, through the region
    if loss and hasattr(model, "loss_function"):
        model.loss_function = partial(torch.compile(_own_copy(_call_loss), **compile_options), model.loss_function)
    return model


def uncompile(model: nn.Module) -> nn.Module:
    """Undo `compile_for_training` in place (the layers and the loss run eagerly again)."""
    backbone = getattr(model, "model", model)
    for layer in getattr(backbone, "layers", []):
        layer._compiled_call_impl = None
    if "_loss_function" in vars(model):
        del model._loss_function
    return model
