"""The fast decode path: static latent cache, absorbed attention over it, and `generate()` using it.

CPU tests check the logic against the eager path (DynamicCache, expanded prefill and absorbed decode); the GPU
tests check the compiled (CUDA-graph) step and the FP8 weights against the same eager path.
"""

import copy

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling.latent_cache import LatentStaticCache, host_seq_length


def tiny_model(seed: int = 0, **overrides) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(tiny_config(**overrides)).eval()


def left_padded_batch(vocab: int, pads=(0, 3, 1), length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(pads), length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def greedy(model, ids, mask, new_tokens: int, **kwargs):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs,
    )  # fmt: skip


def returned_cache(out):
    return out.get("cache", out.get("past_key_values"))


def test_latent_cache_writes_rows_at_the_running_length():
    config = tiny_config()
    cache = LatentStaticCache(config, max_cache_len=10)
    r, rope = config.kv_lora_rank, config.qk_rope_head_dim
    assert host_seq_length(cache) == 0
    first = torch.randn(2, 1, 4, r), torch.randn(2, 1, 4, rope)
    keys, values = cache.update(*first, layer_idx=0)
    assert keys.shape == (2, 1, 10, r) and values.shape == (2, 1, 10, rope)
    second = torch.randn(2, 1, 1, r), torch.randn(2, 1, 1, rope)
    cache.update(*second, layer_idx=0)
    buffer = cache.layers[0].latent_and_rope  # [B, L, r + rope]: latent then roped key, per token
    assert torch.equal(buffer[:, :4], torch.cat([first[0][:, 0], first[1][:, 0]], -1))
    assert torch.equal(buffer[:, 4], torch.cat([second[0][:, 0, 0], second[1][:, 0, 0]], -1))
    assert not buffer[:, 5:].any()
    assert torch.equal(keys[:, 0], buffer[..., :r]) and torch.equal(values[:, 0], buffer[..., r:])  # views
    assert int(cache.layer_length(0)) == 5 and cache.layer_length(1) == 0
    assert host_seq_length(cache) == 5
    cache.reset()
    assert int(cache.layer_length(0)) == 0 and not buffer.any()


def test_latent_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_cache_len"):
        LatentStaticCache(tiny_config(), max_cache_len=0)
    cache = LatentStaticCache(tiny_config(), max_cache_len=4)
    with pytest.raises(ValueError, match="heads"):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), layer_idx=0)


def test_static_cache_forward_matches_eager_prefill_and_decode():
    """Prefill then teacher-forced decode steps: the same logits through both caches (fp32 CPU)."""
    model = tiny_model()
    ids, mask = left_padded_batch(model.config.vocab_size)
    steps = torch.randint(3, model.config.vocab_size, (ids.shape[0], 4))
    static = LatentStaticCache(model.config, max_cache_len=ids.shape[1] + steps.shape[1])
    outputs = {}
    for name, cache in (("eager", None), ("static", static)):
        logits, attn_mask = [], mask
        out = model(ids, attention_mask=attn_mask, cache=cache, use_cache=True)
        cache, logits = out.get("cache", out.get("past_key_values")), [out.logits[:, -1]]
        for t in range(steps.shape[1]):
            attn_mask = torch.cat([attn_mask, torch.ones_like(attn_mask[:, :1])], dim=1)
            position = attn_mask.sum(-1, keepdim=True) - 1
            out = model(steps[:, t : t + 1], attention_mask=attn_mask, position_ids=position, cache=cache)
            logits.append(out.logits[:, -1])
        outputs[name] = torch.stack(logits, 1)
    torch.testing.assert_close(outputs["static"], outputs["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 1)], ids=["unpadded", "left-padded"])
def test_generate_with_static_cache_gives_the_eager_tokens(pads):
    model = tiny_model(seed=1)
    ids, mask = left_padded_batch(model.config.vocab_size, pads)
    eager = greedy(model, ids, mask, 12, cache_implementation="dynamic")
    fast = greedy(model, ids, mask, 12, cache_implementation="static")
    assert isinstance(returned_cache(fast), LatentStaticCache)
    assert not isinstance(returned_cache(eager), LatentStaticCache)
    assert torch.equal(fast.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(eager.scores), rtol=1e-4, atol=1e-4)


def test_generate_default_cache_is_static_only_on_cuda_in_eval_mode(monkeypatch):
    model = tiny_model()
    ids, mask = left_padded_batch(model.config.vocab_size)
    assert not isinstance(returned_cache(greedy(model, ids, mask, 2)), LatentStaticCache)  # CPU: unchanged
    # what the hook reads; the model itself stays on the CPU
    monkeypatch.setattr(DeepSeekForCausalLM, "device", property(lambda self: torch.device("cuda")))
    config = copy.deepcopy(model.generation_config)
    config.num_beams = config.num_return_sequences = 1  # what generate resolves before preparing the cache
    model_kwargs = {}
    model._prepare_cache_for_generation(config, model_kwargs, None, 1, 8)
    assert config.cache_implementation == "static"
    assert any(isinstance(v, LatentStaticCache) for v in model_kwargs.values())
    model.train()
    config = copy.deepcopy(model.generation_config)
    model._prepare_cache_for_generation(config, {}, None, 1, 8)
    assert config.cache_implementation is None


def test_beam_search_with_static_cache_gives_the_eager_beams():
    model = tiny_model(seed=4)
    ids, mask = left_padded_batch(model.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, cache_implementation="dynamic", **kwargs)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), eager)


def test_sampling_with_static_cache_draws_the_eager_tokens():
    model = tiny_model(seed=5)
    ids, mask = left_padded_batch(model.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0)
    outputs = []
    for cache_implementation in ("dynamic", "static"):
        torch.manual_seed(11)
        outputs.append(model.generate(ids, cache_implementation=cache_implementation, **kwargs))
    assert torch.equal(*outputs)


def test_static_cache_grows_to_the_longest_call():
    model = tiny_model()
    ids, mask = left_padded_batch(model.config.vocab_size)
    first = returned_cache(greedy(model, ids, mask, 6, cache_implementation="static"))
    second = returned_cache(greedy(model, ids[:, 2:], mask[:, 2:], 2, cache_implementation="static"))
    # generate sizes it to prompt + new tokens - 1 (the last token is never fed back); a shorter call reuses that
    assert first.layers[0].max_cache_len == second.layers[0].max_cache_len == ids.shape[1] + 6 - 1


def reference_logits(model, sequences, mask, prompt_len: int) -> torch.Tensor:
    """Logits predicting each generated token from one uncached forward (expanded attention: an independent
    computation) over prompt + generated tokens, with generate's positions for left-padded rows."""
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, prompt_len:])], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    return logits[:, prompt_len - 1 : -1].float()


def assert_greedy_tokens_match(
    fast, reference: torch.Tensor, prompt_len: int, tolerance: float, min_close: float = 1.0
) -> None:
    """The fast path's raw logits are within `tolerance` of the reference's at (at least `min_close` of) the
    generated positions, and where they are and the reference's top-2 margin exceeds `tolerance` (below it
    rounding may legitimately flip a near-tie) it picked the reference's argmax. Tokens are compared on the
    processed scores (`min_new_tokens` forbids EOS). In bf16 an MoE router near-tie can pick another expert for
    one token, a large but rare logit difference: `min_close` < 1 allows for those."""
    tokens = fast.sequences[:, prompt_len:]
    logits = torch.stack(fast.logits, dim=1).float()
    close = (logits - reference).abs().amax(-1) <= tolerance  # [B, new tokens]
    assert close.float().mean() >= min_close, f"{close.float().mean():.3f} of positions close"
    reference = reference.masked_fill(torch.stack(fast.scores, dim=1).isneginf(), float("-inf"))
    top2 = reference.topk(2, dim=-1).values
    decided = ((top2[..., 0] - top2[..., 1]) > tolerance) & close
    assert decided.float().mean() > 0.5, "too many near-ties for a meaningful check"
    assert torch.equal(tokens[decided], reference.argmax(-1)[decided])


def test_fast_path_tokens_match_an_uncached_reference():
    model = tiny_model(seed=2)
    ids, mask = left_padded_batch(model.config.vocab_size)
    fast = greedy(model, ids, mask, 10, cache_implementation="static")
    assert_greedy_tokens_match(fast, reference_logits(model, fast.sequences, mask, ids.shape[1]), ids.shape[1], 1e-4)


GPU_TEST_CONFIG = dict(
    hidden_size=256, moe_intermediate_size=128, intermediate_size=512, kv_lora_rank=128, q_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=512, max_position_embeddings=512,
    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, initializer_range=0.1, num_hidden_layers=2,
)  # fmt: skip


def gpu_test_batch(vocab: int, device):
    # 12 rows x 4 choices >= 2 x 16 experts: the MoE layers take the dense decode path on CUDA (moe_decode.py)
    ids, mask = left_padded_batch(vocab, pads=(0, 5, 2, 0) * 3, length=40)
    return ids.to(device), mask.to(device)


@pytest.mark.gpu
def test_compiled_fast_path_matches_eager_on_gpu():
    """bf16 on CUDA: the default generate (static latent cache, compiled CUDA-graph step) against an uncached
    eager forward over the same tokens: the same greedy tokens outside bf16 near-ties, close logits."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(**GPU_TEST_CONFIG)).to("cuda", torch.bfloat16).eval()
    ids, mask = gpu_test_batch(model.config.vocab_size, "cuda")
    fast = greedy(model, ids, mask, 24)  # the default on CUDA
    assert isinstance(returned_cache(fast), LatentStaticCache)
    with torch.no_grad():
        reference = reference_logits(model, fast.sequences, mask, ids.shape[1])
    tolerance = 0.03 * reference.abs().amax().item()
    assert_greedy_tokens_match(fast, reference, ids.shape[1], tolerance, min_close=0.9)


def assert_fp8_decode_within_quantisation_noise(model, ids, mask, new_tokens: int, **generate_kwargs) -> None:
    """FP8 weights through generate's default path: its logits against an uncached FP8 forward over the same tokens
    differ by no more than FP8 itself differs from the same weights dequantised. In bf16 a one-ulp difference in an
    activation (absorbed decode vs expanded prefill) can move its E4M3 rounding by a whole step, so the two FP8
    paths legitimately differ at the level of FP8's own activation-quantisation noise, never by more; a wrong
    cache, kernel or weight would (the fp32 test above checks the exact case)."""
    from hf_deepseek.modeling.fp8 import convert_to_fp8_inference, dequantize_fp8_model

    model = convert_to_fp8_inference(model)
    fast = greedy(model, ids, mask, new_tokens, **generate_kwargs)
    assert isinstance(returned_cache(fast), LatentStaticCache)
    with torch.no_grad():
        reference = reference_logits(model, fast.sequences, mask, ids.shape[1])
        dequantized = dequantize_fp8_model(copy.deepcopy(model), torch.bfloat16)
        unquantized = reference_logits(dequantized, fast.sequences, mask, ids.shape[1])
    error = (torch.stack(fast.logits, dim=1).float() - reference).abs().amax(-1)  # [B, new tokens]
    noise = (reference - unquantized).abs().amax(-1)
    assert error[:, 0].amax() <= 0.01 * reference.abs().amax(), "the prefill's logits are the reference's"
    assert error.mean() <= noise.mean(), f"cached FP8 decode off by {error.mean():.3f}, FP8 noise {noise.mean():.3f}"


def test_fp8_bf16_decode_is_within_quantisation_noise():
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(**GPU_TEST_CONFIG)).to(torch.bfloat16).eval()  # emulated FP8 GEMMs
    ids, mask = gpu_test_batch(model.config.vocab_size, "cpu")
    assert_fp8_decode_within_quantisation_noise(model, ids, mask, 8, cache_implementation="static")


@pytest.mark.gpu
def test_fp8_compiled_fast_path_is_within_quantisation_noise_on_gpu():
    """FP8 weights on CUDA: Triton quantisation and FP8 GEMMs (cuBLAS blockwise, Triton) inside the compiled step."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(**GPU_TEST_CONFIG)).to("cuda", torch.bfloat16).eval()
    ids, mask = gpu_test_batch(model.config.vocab_size, "cuda")
    assert_fp8_decode_within_quantisation_noise(model, ids, mask, 24)


def test_dense_decode_experts_match_the_per_expert_loop():
    from hf_deepseek.modeling.moe import RoutedExperts
    from hf_deepseek.modeling.moe_decode import dense_experts, use_dense_experts

    torch.manual_seed(0)
    config = tiny_config()
    experts = RoutedExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(12, config.hidden_size)
    indices = torch.stack([torch.randperm(config.n_routed_experts)[:2] for _ in range(12)])
    weights = torch.rand(12, 2)
    with torch.no_grad():
        assert not use_dense_experts(experts, x, 2)  # CPU: the exact per-expert loop stays
        torch.testing.assert_close(dense_experts(experts, x, indices, weights), experts(x, indices, weights))


def test_fp8_weights_decode_over_the_cache_as_an_uncached_forward():
    """FP8 inference weights (emulated GEMMs): cached decoding through both caches against one uncached forward.
    The prefill's keys and values come from kv_b_proj's dequantised weight, as absorbed decoding's do: an FP8 GEMM
    there would quantise the latent too, and later steps would see other keys (logits off by ~35% of their range
    on the GPU test's model)."""
    from hf_deepseek.modeling.fp8 import convert_to_fp8_inference

    model = tiny_model(seed=3, kv_lora_rank=128)  # one full 128-wide block
    assert model._default_compile_config().dynamic is None  # generate's compile: one shape-generic graph
    convert_to_fp8_inference(model)
    assert model._default_compile_config().dynamic is False  # FP8's Triton kernels: one graph per shape
    ids, mask = left_padded_batch(model.config.vocab_size)
    fast = greedy(model, ids, mask, 6, cache_implementation="static")
    eager = greedy(model, ids, mask, 6, cache_implementation="dynamic")
    assert isinstance(returned_cache(fast), LatentStaticCache)
    assert torch.equal(fast.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(eager.logits), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        reference = reference_logits(model, fast.sequences, mask, ids.shape[1])
    assert_greedy_tokens_match(fast, reference, ids.shape[1], 1e-4)
