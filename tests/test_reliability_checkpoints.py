"""Broken checkpoints give errors naming the file, the tensor and what was expected; saving is atomic.

Each test damages a freshly saved tiny checkpoint the way a half-finished download, a wrong config or a bad
conversion would, and checks the message `from_pretrained` gives (see hf_deepseek.modeling.checkpoint_checks).
"""

import json
import os
import shutil

import pytest
import torch
import transformers.modeling_utils
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling.checkpoint_checks import CheckpointError
from hf_deepseek.modeling.fp8_checkpoint import save_fp8_pretrained

KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [kv_lora_rank + qk_rope_head_dim, hidden] = [40, 64]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config())
    path = tmp_path_factory.mktemp("good")
    model.save_pretrained(path)
    return path, model.state_dict()


def copy_of(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved[0], target)
    return target


def edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def load_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        DeepSeekForCausalLM.from_pretrained(path, **kwargs)
    return str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.999], ids=["half", "last-bytes"])
def test_truncated_safetensors_names_file_and_tensor(saved, tmp_path, keep):
    path = copy_of(saved, tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    message = load_error(path)
    assert str(file) in message and "truncated" in message
    if keep > 0.9:  # the header survives: the tensor whose bytes are cut off is named
        assert "tensor 'model." in message and "the file holds only" in message


def test_file_shorter_than_the_header_prefix(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    (path / "model.safetensors").write_bytes(b"\x01\x02")
    assert "too short for a safetensors file" in load_error(path)


def test_missing_tensor_names_it_and_its_shape(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    file = edit_tensors(path, lambda t: t.pop(KV_A))
    message = load_error(path)
    assert message.startswith(str(file)) and f"'{KV_A}' of shape [40, 64]" in message


def test_missing_expert_is_named_per_expert(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_tensors(path, lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight"))
    assert "'model.layers.2.mlp.experts.5.down_proj.weight' of shape [64, 32]" in load_error(path)


def test_wrong_shape_names_stored_and_expected_shape(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    file = edit_tensors(path, lambda t: t.update({KV_A: t[KV_A][:-1].clone()}))
    assert load_error(path) == f"{file}: tensor '{KV_A}' has shape [39, 64], but config.json implies [40, 64]"


def test_wrong_dtype_names_the_dtype(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_tensors(path, lambda t: t.update({KV_A: (t[KV_A] * 100).to(torch.int32)}))
    message = load_error(path)
    assert f"'{KV_A}' has dtype I32; expected a float dtype" in message


def test_fp8_weight_without_fp8_config_is_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_tensors(path, lambda t: t.update({KV_A: t[KV_A].to(torch.float8_e4m3fn)}))
    assert f"'{KV_A}' is F8_E4M3 but config.json has no FP8 quantization_config" in load_error(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_tensor_and_index(saved, tmp_path, bad):
    path = copy_of(saved, tmp_path)

    def poison(tensors):
        tensors[KV_A][3, 7] = bad

    edit_tensors(path, poison)
    message = load_error(path)
    assert f"tensor '{KV_A}' holds 1 non-finite value(s)" in message and "first at index [3, 7]" in message
    DeepSeekForCausalLM.from_pretrained(path, check_finite=False)  # the user may opt out of the scan


def test_config_that_disagrees_with_the_weights(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_config(path, hidden_size=128)
    message = load_error(path)
    assert "'model.embed_tokens.weight' has shape [97, 64], but config.json implies [97, 128]" in message
    assert "probably does not belong to these weights" in message and "hidden_size=128" in message


def test_config_with_fewer_experts_than_the_weights(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_config(path, n_routed_experts=4, n_group=1)
    assert "'model.layers.1.mlp.gate.weight' has shape [8, 64], but config.json implies [4, 64]" in load_error(path)


def test_config_with_more_layers_than_the_weights(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_config(path, num_hidden_layers=5)  # layer 3 is the stored MTP layer (same modules); layer 4 is absent
    message = load_error(path)
    assert "lacks" in message and "that config.json implies, e.g. 'model.layers.4." in message


def test_transformers_layout_without_the_mtp_layer_is_accepted(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    DeepSeekForCausalLM.from_pretrained(path)  # transformers' DeepseekV3 drops MTP; it is initialised afresh
    edit_tensors(path, lambda t: t.pop("model.layers.2.mlp.gate.weight"))
    assert "'model.layers.2.mlp.gate.weight'" in load_error(path)


def test_pickle_weights_are_refused_unless_asked_for(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    os.remove(path / "model.safetensors")
    torch.save(saved[1], path / "pytorch_model.bin")
    message = load_error(path)
    assert f"{path / 'pytorch_model.bin'}: only pickle weights here, and unpickling can execute code" in message
    assert "use_safetensors=False" in message


def test_sharded_checkpoint_with_a_missing_shard(tmp_path):
    model = DeepSeekForCausalLM(tiny_config())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(tmp_path / shards[-1])
    message = load_error(tmp_path)
    assert f"{tmp_path / shards[-1]}: missing; the index places" in message


def test_fp8_scale_inv_of_the_wrong_shape(tmp_path):
    model = DeepSeekForCausalLM(tiny_config())
    save_fp8_pretrained(model, tmp_path)
    scale = KV_A + "_scale_inv"
    file = edit_tensors(tmp_path, lambda t: t.update({scale: torch.ones(2, 1)}))
    message = load_error(tmp_path)
    assert message == (
        f"{file}: tensor '{scale}' is F32 [2, 1]; FP8 weight '{KV_A}' of shape [40, 64] needs float32 [1, 1] "
        "(one scale per 128x128 block)"
    )
    edit_tensors(tmp_path, lambda t: t.pop(scale))
    assert f"FP8 tensor '{KV_A}' has no '{scale}'" in load_error(tmp_path)


# ------------------------------------------------------------------------------ atomic save


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(saved, tmp_path, monkeypatch):
    path = copy_of(saved, tmp_path)
    before = sorted(os.listdir(path))
    real_save_file = transformers.modeling_utils.safe_save_file

    def dies_half_way(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", dies_half_way)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        DeepSeekForCausalLM(tiny_config()).save_pretrained(path)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # the temporary directory is gone
    loaded = DeepSeekForCausalLM.from_pretrained(path).state_dict()
    for name, tensor in saved[1].items():
        assert torch.equal(loaded[name], tensor), name


def test_resaving_with_other_sharding_leaves_no_stale_files(tmp_path):
    model = DeepSeekForCausalLM(tiny_config())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "tokenizer.json").write_text("{}")  # files that are not weights stay
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "generation_config.json",
        "hf_deepseek_auto.py",  # what config.json's auto_map names (plain transformers loading)
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded = DeepSeekForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
