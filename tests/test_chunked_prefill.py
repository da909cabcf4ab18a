"""Chunked prefill through transformers' `generate(prefill_chunk_size=...)`: a long prompt prefilled in chunks
straight into the cache (the latent cache on the fast path) gives the same tokens as one prefill, with left padding,
for the dynamic and the static latent cache."""

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_chunked_prefill_generates_the_same_tokens(cache):
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 97, (3, 45))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: a shorter prompt in the batch
    ids[1, :7] = 0
    common = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation=cache)
    lengths = []  # tokens per backbone forward
    model.model.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)  # fmt: skip
    whole = model.generate(ids, **common)
    assert lengths[0] == 45
    lengths.clear()
    chunked = model.generate(ids, prefill_chunk_size=16, **common)
    assert lengths[:3] == [16, 16, 13] and set(lengths[3:]) == {1}  # the prompt in three chunks, then one at a time
    assert torch.equal(chunked, whole)
