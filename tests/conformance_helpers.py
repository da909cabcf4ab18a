"""A tiny DeepseekV3 pair for the conformance tests: transformers' own model with O(1) random weights, and ours
loaded from its checkpoint (so both hold the same weights), in fp32 on the CPU."""

import torch
from test_parity import CONFIGS, randomize, transformers_config
from transformers import DeepseekV3ForCausalLM

from hf_deepseek import DeepSeekForCausalLM

PROMPT = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(2))


def reference_pair(directory, config: str = "grouped-yarn", attn: str = "sdpa", **overrides):
    """(ours, transformers') on the same weights; `overrides` change the transformers config (e.g. RoPE)."""
    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(transformers_config(**{**CONFIGS[config], **overrides}))
    randomize(ref, seed=1)
    ref.save_pretrained(directory)
    ref = DeepseekV3ForCausalLM.from_pretrained(directory, attn_implementation=attn).eval()
    ours = DeepSeekForCausalLM.from_pretrained(directory, attn_implementation=attn).eval()
    return ours, ref


def generate_both(ours, ref, seed: int | None = None, **kwargs) -> tuple:
    """The same `generate` call on both models (re-seeded before each when `seed` is given)."""
    outputs = []
    for model in (ours, ref):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(model.generate(PROMPT, pad_token_id=2, **kwargs))
    return tuple(outputs)
