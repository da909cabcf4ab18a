"""The decode step's compile settings (`compile_regions.decode_compile_config`): a model with FP8 layers keeps its
GEMMs on cuBLAS (`FP8_INDUCTOR_OPTIONS`) in both places generate() compiles a step, its mode's options kept; any
other model, or settings with options of their own, compile as transformers' CompileConfig says."""

import torch
from conftest import tiny_config
from transformers import CompileConfig

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.generation import fast_generate
from hf_deepseek.modeling.compile_regions import FP8_INDUCTOR_OPTIONS, decode_compile_config
from hf_deepseek.modeling.fp8 import convert_to_fp8_inference


def fp8_model():
    return convert_to_fp8_inference(DeepSeekForCausalLM(tiny_config(hidden_size=128)).eval())


def test_settings_for_fp8_and_bf16_models():
    config = CompileConfig()
    fp8 = decode_compile_config(fp8_model(), config)
    assert fp8.mode is None and fp8.options == {"triton.cudagraphs": True, **FP8_INDUCTOR_OPTIONS}
    assert (fp8.fullgraph, fp8.dynamic, fp8.backend) == (config.fullgraph, config.dynamic, config.backend)
    assert config.mode == "reduce-overhead" and config.options is None  # the caller's settings untouched
    assert decode_compile_config(DeepSeekForCausalLM(tiny_config()), config) is config
    own = CompileConfig(mode=None, options={"max_autotune": True})
    assert decode_compile_config(fp8_model(), own) is own
    eager = CompileConfig(backend="eager")
    assert decode_compile_config(fp8_model(), eager) is eager
    tuned = decode_compile_config(fp8_model(), CompileConfig(mode="max-autotune"))
    assert tuned.options["max_autotune"] and tuned.options["max_autotune_gemm_backends"] == "ATEN"


def test_both_decode_compiles_take_them(monkeypatch):
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = fp8_model()
    model.get_compiled_call(CompileConfig())  # transformers' static-cache loop
    config = CompileConfig()
    config._compile_all_devices = True  # what lets the device loop compile on the CPU
    generation_config = model.generation_config
    generation_config.compile_config = config
    fast_generate.compiled_for_generate(model, fast_generate.decode_step, generation_config, "_test_step")
    assert len(seen) == 2
    for kwargs in seen:
        assert kwargs["mode"] is None and kwargs["options"]["max_autotune_gemm_backends"] == "ATEN"
        assert kwargs["options"]["triton.cudagraphs"] is True
