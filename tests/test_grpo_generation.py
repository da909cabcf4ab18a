"""The GRPO rollout config: `fast_generation_config` turns TRL's rollout config onto the fast decode path (static
latent cache, compiled step) and, greedy, generates the same tokens as TRL's default on the same model."""

import torch
from trainer_helpers import tiny_model
from transformers import GenerationConfig

from hf_deepseek.data import build_tokenizer
from hf_deepseek.trainers.grpo import fast_generation_config


def test_fast_generation_config_matches_trl_default_tokens():
    tok = build_tokenizer()
    tok.padding_side = "left"  # as TRL pads prompts
    torch.manual_seed(0)
    model = tiny_model(tok).train()  # TRL generates with the policy in training mode
    trl_config = GenerationConfig(
        max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        cache_implementation=None, disable_compile=True,
    )  # fmt: skip
    fast = fast_generation_config(trl_config)
    assert (fast.cache_implementation, fast.disable_compile) == ("static", False)
    assert (trl_config.cache_implementation, trl_config.disable_compile) == (None, True)  # a copy
    prompts = [[{"role": "user", "content": text}] for text in ("Calculate 12 + 345.", "Calculate 9 + 8.")]
    inputs = tok.apply_chat_template(prompts, add_generation_prompt=True, padding=True, return_tensors="pt",
                                     return_dict=True)  # fmt: skip
    with torch.no_grad():
        default = model.generate(**inputs, generation_config=trl_config)
        fast_out = model.generate(**inputs, generation_config=fast)
    assert torch.equal(default, fast_out)
