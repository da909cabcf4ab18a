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
