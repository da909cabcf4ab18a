"""The latent KV cache: what it holds (asserted in bytes) and the absorbed decode path that reads it."""

import pytest
import torch
from conftest import tiny_config
from test_parity import randomize

from hf_deepseek import DeepSeekForCausalLM


@pytest.fixture
def model() -> DeepSeekForCausalLM:
    model = DeepSeekForCausalLM(tiny_config()).eval()
    randomize(model, seed=0)
    return model


def cached_tensors(cache, layer_idx: int) -> list[torch.Tensor]:
    layer = cache.layers[layer_idx]
    return [layer.keys, layer.values]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_only_latent_and_rope_key(model, dtype):
    model = model.to(dtype)
    cfg = model.config
    batch, prompt = 3, 11
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 32 + 8 = 40 values, against 2 * 4 heads * 16 = 128
    for layer_idx in range(cfg.num_hidden_layers):
        nbytes = sum(t.numel() * t.element_size() for t in cached_tensors(cache, layer_idx))
        assert nbytes == batch * prompt * per_token * dtype.itemsize
    assert len(cache.layers) == cfg.num_hidden_layers  # the MTP layer caches nothing during generation


def test_decode_never_expands_cached_tokens(model):
    cfg = model.config
    calls = []
    for layer in model.model.decoder_layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    ids = torch.randint(3, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # expanded attention over the whole sequence
        assert calls, "the expanded path (training / prefill) does use kv_b_proj"
        out = model(ids[:, :8], use_cache=True)
        calls.clear()
        cache, steps = out.past_key_values, []
        for t in range(8, 20):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert calls == []  # not once, for any layer, on any cached token
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:], atol=1e-5, rtol=0)


def test_several_new_tokens_after_a_prefix_match_full_forward(model):
    """Chunked continuation (e.g. verifying speculative drafts): causal mask offset by the cached length."""
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :9], use_cache=True).past_key_values
        chunk = model(ids[:, 9:13], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(chunk, full[:, 9:13], atol=1e-5, rtol=0)


def test_absorbed_weights_are_views_that_follow_the_weight(model):
    attn = model.model.decoder_layers[0].self_attn
    with torch.no_grad():
        first = attn.absorbed_weights()  # views of the weight: nothing copied or recomputed per step
        storage = attn.kv_b_proj.weight.untyped_storage().data_ptr()
        assert all(w.untyped_storage().data_ptr() == storage for w in first)
        first = [w.clone() for w in first]
        attn.kv_b_proj.weight.mul_(2.0)  # an optimizer step changes the weights in place
        second = attn.absorbed_weights()
    torch.testing.assert_close(second[0], 2 * first[0])
    w = attn.kv_b_proj.weight.view(attn.num_heads, attn.nope_dim + attn.v_dim, attn.kv_lora_rank)
    torch.testing.assert_close(second[1], w[:, attn.nope_dim :])


def test_absorbed_attention_matches_expanded_attention_in_float64(model):
    """The two formulations of one layer, in float64: equal to rounding."""
    attn = model.model.decoder_layers[1].self_attn.double()
    torch.manual_seed(1)
    heads, seq = attn.num_heads, 7
    q_nope = torch.randn(2, heads, 1, attn.nope_dim, dtype=torch.float64)
    q_rope = torch.randn(2, heads, 1, attn.rope_dim, dtype=torch.float64)
    latent = torch.randn(2, 1, seq, attn.kv_lora_rank, dtype=torch.float64)
    k_rope = torch.randn(2, 1, seq, attn.rope_dim, dtype=torch.float64)
    with torch.no_grad():
        absorbed, _ = attn._absorbed_attention(q_nope, q_rope, latent, k_rope, None, past_len=seq - 1)
        expanded, _ = attn._expanded_attention(q_nope, q_rope, latent, k_rope, None)
    torch.testing.assert_close(absorbed, expanded, atol=1e-12, rtol=0)
