"""Regional compilation for training: which modules `compile_for_training` compiles, its undo, and the trainers'
`compile_layers` switch. (Compiled steps themselves are measured on the GPU, docs/PERF.md: on a CI core the
first compiled step takes minutes.)"""

import pytest
import torch
from trainer_helpers import FAST_ARGS, addition_chats, tiny_model

from hf_deepseek.data import build_tokenizer
from hf_deepseek.modeling.compile_regions import compile_for_training, uncompile
from hf_deepseek.trainers.sft import DeepSeekSFTConfig, DeepSeekSFTTrainer


def compiled_layers(model) -> list[bool]:
    return [layer._compiled_call_impl is not None for layer in model.model.layers]


def test_every_layer_and_the_loss_are_compiled_and_uncompiled():
    model = tiny_model(build_tokenizer())
    eager_loss = model.loss_function
    compile_for_training(model)
    assert compiled_layers(model) == [True] * len(model.model.layers)  # decoder layers and the MTP module
    assert model.loss_function is not eager_loss
    uncompile(model)
    assert compiled_layers(model) == [False] * len(model.model.layers)
    assert model.loss_function is eager_loss
    with pytest.raises(TypeError, match="model.layers"):
        compile_for_training(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("switch", [False, True])
def test_trainer_switch_compiles_the_layers(tmp_path, switch):
    tok = build_tokenizer()
    model = tiny_model(tok)
    args = DeepSeekSFTConfig(output_dir=str(tmp_path), max_steps=1, compile_layers=switch, **FAST_ARGS)
    DeepSeekSFTTrainer(model=model, args=args, train_dataset=addition_chats(4), processing_class=tok)
    assert compiled_layers(model) == [switch] * len(model.model.layers)


def test_fp8_models_keep_their_scaled_gemms_on_aten_under_inductor(monkeypatch):
    """Inductor would autotune its own Triton scaled-mm templates against cuBLAS, and its blockwise template reads
    1x128 scales row-major where torch._scaled_mm takes (and the FP8 backend passes) them column-major."""
    from hf_deepseek.modeling.compile_regions import FP8_INDUCTOR_OPTIONS
    from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    tok = build_tokenizer()
    compile_for_training(tiny_model(tok))
    assert calls and all("options" not in kwargs for kwargs in calls)  # bf16: Inductor's defaults
    fp8 = convert_to_fp8_training(tiny_model(tok), FP8Recipe(backend="emulated"))
    calls.clear()
    compile_for_training(fp8)
    assert calls and all(kwargs["options"] == FP8_INDUCTOR_OPTIONS for kwargs in calls)
    calls.clear()
    compile_for_training(fp8, mode="max-autotune")  # the caller's choice stands (torch.compile takes one of the two)
    assert all("options" not in kwargs for kwargs in calls)
    calls.clear()
    compile_for_training(fp8, backend="aot_eager")
    assert all("options" not in kwargs for kwargs in calls)


@pytest.mark.parametrize("probe", ["triton_available", "fp8_kernels_available"])
def test_capability_probes_first_called_inside_compiled_code_do_not_recompile(monkeypatch, probe):
    """The kernels' capability probes set a module global on their first call. Called first inside compiled code (a
    compiled training step's first MoE block, whose routing asks whether its kernel runs), Dynamo must not guard on
    that global, or the block's next call recompiles."""
    from torch._dynamo.testing import CompileCounter

    from hf_deepseek.kernels import moe_gemv

    monkeypatch.setattr(moe_gemv, "_TRITON", None)
    monkeypatch.setattr(moe_gemv, "_FP8", None)
    torch._dynamo.reset()
    counter = CompileCounter()
    available = getattr(moe_gemv, probe)

    @torch.compile(backend=counter, fullgraph=True)
    def block(x):
        return x * 2 if available() else x + 1

    x = torch.ones(3)
    assert torch.equal(block(x), block(x)) and counter.frame_count == 1
    torch._dynamo.reset()
