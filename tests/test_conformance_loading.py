"""Loading across the head and base classes and save formats, as transformers handles them: a checkpoint saved from
`DeepSeekModel` loads into `DeepSeekForCausalLM` (the `model.` prefix added, the head newly initialised) and back,
`save_pretrained(..., save_original_format=False)` (stacked experts) loads back, and an FP8 checkpoint without the
MTP layer (what transformers' DeepseekV3 writes) loads by the bf16 rules: the MTP module newly initialised, reported."""

import logging
import re

import torch
from conformance_helpers import PROMPT, reference_pair
from safetensors.torch import load_file, save_file

from hf_deepseek import DeepSeekForCausalLM, DeepSeekModel
from hf_deepseek.modeling.fp8_checkpoint import save_fp8_pretrained


def assert_same_tensors(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_base_model_checkpoint_loads_into_the_head_class_and_back(tmp_path):
    ours, _ = reference_pair(tmp_path / "ref")
    ours.model.save_pretrained(tmp_path / "base")
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "base" / "model.safetensors"))
    head = DeepSeekForCausalLM.from_pretrained(tmp_path / "base")
    assert_same_tensors(head.model.state_dict(), ours.model.state_dict())
    assert not torch.equal(head.lm_head.weight, ours.lm_head.weight)  # not in the checkpoint: newly initialised
    ours.save_pretrained(tmp_path / "head")
    base = DeepSeekModel.from_pretrained(tmp_path / "head")  # and the head class's checkpoint into the base class
    assert_same_tensors(base.state_dict(), ours.model.state_dict())


def test_checkpoint_saved_without_original_format_loads_back(tmp_path):
    ours, _ = reference_pair(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "stacked", save_original_format=False)
    stored = load_file(tmp_path / "stacked" / "model.safetensors")
    assert "model.layers.1.mlp.experts.gate_up_proj" in stored  # in-memory names, not DeepSeek's per-expert ones
    again = DeepSeekForCausalLM.from_pretrained(tmp_path / "stacked")
    assert_same_tensors(again.state_dict(), ours.state_dict())


def test_fp8_checkpoint_without_mtp_layer_loads_like_bf16(tmp_path, caplog):
    ours, ref = reference_pair(tmp_path / "ref")  # transformers' save: no MTP layer; ours has one (new)
    mtp_prefix = f"model.layers.{ours.config.num_hidden_layers}."
    save_fp8_pretrained(ours, tmp_path / "fp8")
    full = DeepSeekForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    assert any(k.startswith(mtp_prefix) for k in stored)
    save_file(
        {k: v for k, v in stored.items() if not k.startswith(mtp_prefix)},
        tmp_path / "fp8" / "model.safetensors",
        metadata={"format": "pt"},
    )
    with caplog.at_level(logging.WARNING):
        without_mtp = DeepSeekForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    report = "\n".join(r.getMessage() for r in caplog.records)
    # transformers' own table, as the bf16 load prints it
    assert "LOAD REPORT" in report and re.search(rf"{re.escape(mtp_prefix)}eh_proj\.weight\s*\| MISSING", report)
    with torch.no_grad():
        torch.testing.assert_close(without_mtp(PROMPT).logits, full(PROMPT).logits, atol=0, rtol=0)
    mtp = [p for n, p in without_mtp.named_parameters() if n.startswith(mtp_prefix)]
    assert mtp and all(torch.isfinite(p).all() for p in mtp)
    assert without_mtp.model.layers[-1].enorm.weight.eq(1).all()  # initialised as a fresh model's, not left empty
    # bf16 of the same checkpoint layout (transformers' own save) loads the same way
    assert DeepSeekForCausalLM.from_pretrained(tmp_path / "ref").config.num_nextn_predict_layers == 1
