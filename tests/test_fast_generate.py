"""generate()'s device loop (`generation/fast_generate.py`) against transformers' own loop on the CPU: the same greedy
tokens (left padding, rows ending at different steps, min_new_tokens), the same lengths, sampling from the warped
distribution, one compiled graph across calls, the host's end-of-sequence check only every few steps; and the loop of
hand-captured graphs as it runs on CUDA (graphs of several steps, kept and captured again when they would be stale)."""

import copy

import pytest
import torch
from conftest import tiny_config
from torch._dynamo.utils import counters
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.generation import fast_generate as fg
from hf_deepseek.generation.step_graphs import StepGraphs


def tiny_model(seed: int = 1) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(tiny_config(num_hidden_layers=3, initializer_range=0.1)).eval()


def left_padded(vocab: int, pads=(0, 3, 1), length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(pads), length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def both(model, ids, mask, **kwargs):
    """transformers' loop (dynamic cache) and the device loop on the same call."""
    kwargs = dict(attention_mask=mask, pad_token_id=0, **kwargs)
    eager = model.generate(ids, cache_implementation="dynamic", **kwargs)
    fast = model.generate(ids, cache_implementation="static", fast_loop=True, **kwargs)
    return eager, fast


def frequent_token(model, ids, mask, new_tokens: int) -> int:
    """A token the greedy continuation emits somewhere in the middle: as eos it ends rows at different steps."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         cache_implementation="dynamic")[:, ids.shape[1]:]  # fmt: skip
    return int(out[0, new_tokens // 3])


def test_greedy_tokens_equal_transformers_loop_with_left_padding():
    model = tiny_model()
    ids, mask = left_padded(model.config.vocab_size)
    eager, fast = both(model, ids, mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(fast, eager)


@pytest.mark.parametrize("chunking", ["prefill_chunk_size", "row groups", "PREFILL_TOKENS", "query pieces"])
def test_chunked_prefill_gives_transformers_tokens_with_left_padding(monkeypatch, chunking):
    """Long batches are prefilled straight into the latent cache: whole prompts in groups of rows (each group a fresh
    prefill through a view of its rows of the cache), a prompt longer than `PREFILL_TOKENS` in chunks (later chunks
    attend to the cache through the absorbed path, their scores in pieces of queries), or every row in chunks of
    `prefill_chunk_size`: the tokens stay transformers' unchunked ones, with rows whose padding spans a chunk."""
    from hf_deepseek.modeling import mla_decode

    model = tiny_model()
    ids, mask = left_padded(model.config.vocab_size, pads=(0, 5, 2), length=11)
    kwargs = {}
    if chunking == "prefill_chunk_size":
        kwargs["prefill_chunk_size"] = 3
    elif chunking == "row groups":
        monkeypatch.setattr(fg, "PREFILL_TOKENS", 24)  # two 11-token prompts a forward
    else:
        monkeypatch.setattr(fg, "PREFILL_TOKENS", 4)  # each prompt alone, in chunks of 4 tokens
        if chunking == "query pieces":  # every chunk's scores two queries at a time
            monkeypatch.setattr(mla_decode, "MAX_SCORES", 2 * model.config.num_attention_heads * 32)
    common = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=10, do_sample=False)
    eager = model.generate(ids, cache_implementation="dynamic", **common)  # unchunked
    calls = []
    original = model.forward
    record = lambda *a, **k: calls.append(tuple(k["input_ids"].shape)) or original(*a, **k)  # noqa: E731
    monkeypatch.setattr(model, "forward", record)
    fast = model.generate(ids, cache_implementation="static", fast_loop=True, **common, **kwargs)
    assert torch.equal(fast, eager)
    chunks = {
        "prefill_chunk_size": [(3, 3), (3, 3), (3, 3), (3, 2)],
        "row groups": [(2, 11), (1, 11)],
    }.get(chunking, [(1, 4), (1, 4), (1, 3)] * 3)
    assert calls[: len(chunks)] == chunks and set(calls[len(chunks) :]) <= {(3, 1)}  # the prefill, then steps


def test_rows_ending_at_different_steps_give_transformers_tokens_and_length():
    model = tiny_model()
    ids, mask = left_padded(model.config.vocab_size)
    eos = frequent_token(model, ids, mask, 24)
    eager, fast = both(model, ids, mask, max_new_tokens=24, do_sample=False, eos_token_id=eos)
    assert torch.equal(fast, eager)  # pads after each row's eos (one row never ends here)
    eager, fast = both(model, ids[:2], mask[:2], max_new_tokens=24, do_sample=False, eos_token_id=eos)
    assert torch.equal(fast, eager) and fast.shape[1] < ids.shape[1] + 24  # both rows end: the same shorter length
    eager, fast = both(model, ids, mask, max_new_tokens=24, do_sample=False, eos_token_id=[eos, 5], min_new_tokens=11)
    assert torch.equal(fast, eager)
    ended = torch.isin(fast[:, ids.shape[1] :], torch.tensor([eos, 5]))
    assert ended.any() and not ended[:, :11].any()  # min_new_tokens held back the eos of the row that ends at 10


def test_the_host_checks_for_ended_rows_every_few_steps(monkeypatch):
    model = tiny_model()
    ids, mask = left_padded(model.config.vocab_size, pads=(0,))
    eos = frequent_token(model, ids, mask, 40)
    steps = []
    monkeypatch.setattr(fg, "compiled_decode_step", lambda *a: lambda *args: steps.append(fg.decode_step(*args)))
    eager, fast = both(model, ids, mask, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    assert torch.equal(fast, eager)
    generated = fast.shape[1] - ids.shape[1]
    assert generated < 40  # eos ended it
    assert generated - 1 <= len(steps) < generated - 1 + fg.CHECK_EVERY  # at most CHECK_EVERY - 1 steps past it


def test_compiled_loop_is_one_graph_across_calls_and_prompt_lengths():
    model = tiny_model()
    ids, mask = left_padded(model.config.vocab_size)
    eos = frequent_token(model, ids, mask, 16)
    compile_config = CompileConfig(backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # CPU: transformers would not compile otherwise
    torch.compiler.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for prompt in (ids, ids[:, 2:]):  # a shorter prompt reuses the cache, buffers and graph
                attention = mask[:, -prompt.shape[1] :]
                kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=eos, compile_config=compile_config)
                eager, fast = both(model, prompt, attention, **kwargs)
                assert torch.equal(fast, eager)
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch.compiler.reset()


def test_sampling_draws_from_transformers_warped_distribution():
    """The exponential race over the warped probabilities, tested where the distribution is known exactly."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=6, top_p=0.9, pad_token_id=0)
    choice = fg.TokenChoice.from_config(config, torch.device("cpu"))
    warped = LogitsProcessorList([w for w in choice.warpers])(None, logits.clone() / 1.0)
    reference = LogitsProcessorList([TopKLogitsWarper(6), TopPLogitsWarper(0.9)])(None, logits / 0.7)
    torch.testing.assert_close(warped, reference)
    probs = reference.softmax(-1)[0]
    draws = choice(logits.expand(20000, -1), torch.tensor(0), torch.tensor(0))
    frequency = torch.bincount(draws, minlength=12).float() / draws.numel()
    assert (frequency[probs == 0] == 0).all()  # never a token the warpers removed
    torch.testing.assert_close(frequency, probs, atol=0.015, rtol=0)


def test_sampling_with_top_k_1_is_greedy_and_seeded_runs_repeat():
    model = tiny_model()
    ids, mask = left_padded(model.config.vocab_size)
    eager, fast = both(model, ids, mask, max_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(fast, eager)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.3,
                                   pad_token_id=0, cache_implementation="static", fast_loop=True))  # fmt: skip
    assert torch.equal(*runs)


def test_the_loop_is_the_default_only_on_cuda_for_what_it_supports(monkeypatch):
    model = tiny_model()
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = 4
    inputs = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)}
    assert not fg.wants_fast_loop(model, config, inputs, None)  # CPU
    monkeypatch.setattr(DeepSeekForCausalLM, "device", property(lambda self: torch.device("cuda")))
    assert fg.wants_fast_loop(model, config, inputs, None)
    assert not fg.wants_fast_loop(model, config, inputs, False)
    unsupported = (
        dict(num_beams=2),
        dict(output_scores=True, return_dict_in_generate=True),
        dict(repetition_penalty=1.2),
        dict(disable_compile=True),
        dict(cache_implementation="dynamic"),
    )
    for setting in unsupported:
        other = copy.deepcopy(config)
        other.update(**setting)
        assert not fg.wants_fast_loop(model, other, inputs, None), setting
    assert not fg.wants_fast_loop(model, config, {**inputs, "streamer": object()}, None)
    model.train()
    assert not fg.wants_fast_loop(model, config, inputs, None)  # training mode: only with cache_implementation="static"
    config.cache_implementation = "static"
    assert fg.wants_fast_loop(model, config, inputs, None)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(inputs["input_ids"], max_new_tokens=2, num_beams=2, fast_loop=True)


def test_a_failing_device_loop_falls_back_to_transformers_loop_once_and_for_all(monkeypatch):
    model = tiny_model()
    ids = torch.ones(1, 3, dtype=torch.long)
    monkeypatch.setattr(DeepSeekForCausalLM, "device", property(lambda self: torch.device("cuda")))
    calls = []

    def broken(*args):
        calls.append(1)
        raise fg.DecodeStepError("step failed") from RuntimeError("no CUDA graph today")

    monkeypatch.setattr(fg, "fast_generate", broken)
    assert fg.try_fast_generate(model, ids, None, dict(max_new_tokens=2), None) is None
    assert "no CUDA graph today" in model.fast_loop_error
    assert fg.try_fast_generate(model, ids, None, dict(max_new_tokens=2), None) is None and len(calls) == 1
    with pytest.raises(RuntimeError, match="no CUDA graph"):  # asked for explicitly: the error, not the fallback
        fg.try_fast_generate(model, ids, None, dict(max_new_tokens=2), True)


class ReplayedCalls:
    """`StepGraphs` on the CPU: a "graph" of n steps replays as n calls of the step; every capture is recorded."""

    captures: list = []

    def __init__(self, step, sizes, key, keep=()):
        self.step, self.key, self.keep, self.replays = step, key, keep, []
        self.sizes = sorted(set(sizes), reverse=True)
        ReplayedCalls.captures.append(self)

    def replay(self, n):
        self.replays.append(n)
        for _ in range(n):
            self.step()


@pytest.fixture
def hand_graphs(monkeypatch):
    """The loop as on CUDA with hand-captured graphs, on the CPU: the uncompiled step, graphs as `ReplayedCalls`."""
    ReplayedCalls.captures = []
    monkeypatch.setattr(fg, "hand_graphed_config", lambda model, config: CompileConfig(mode="default"))
    monkeypatch.setattr(fg, "compiled_decode_step", lambda model, config, compile_config: fg.decode_step)
    monkeypatch.setattr(fg, "StepGraphs", ReplayedCalls)
    monkeypatch.setattr(fg, "warm_up", lambda run: run())
    return ReplayedCalls.captures


def test_hand_graphed_loop_replays_several_steps_a_graph_and_keeps_its_graphs(hand_graphs):
    model = tiny_model()
    one, one_mask = left_padded(model.config.vocab_size, pads=(0,))
    eos = frequent_token(model, one, one_mask, 40)
    eager, fast = both(model, one, one_mask, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    assert torch.equal(fast, eager) and len(hand_graphs) == 1
    generated = fast.shape[1] - one.shape[1]
    steps = 1 + sum(hand_graphs[0].replays)  # the warm-up step, then the replays
    assert generated < 40 and generated - 1 <= steps < generated - 1 + fg.CHECK_EVERY
    ids, mask = left_padded(model.config.vocab_size)
    # no eos: 30 tokens = the prefill's, the warm-up's, then graphs of CHECK_EVERY steps while they fit, then ones
    eager, fast = both(model, ids, mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert torch.equal(fast, eager) and len(hand_graphs) == 2  # another batch, another token choice: captured again
    assert hand_graphs[1].replays == [8, 8, 8, 1, 1, 1, 1]
    eager, fast = both(model, ids[:, 1:], mask[:, 1:], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(fast, eager) and len(hand_graphs) == 2  # the same graphs, from the first step on
    assert hand_graphs[1].replays[7:] == [8, 1, 1, 1]
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # weights elsewhere
    eager, fast = both(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(fast, eager) and len(hand_graphs) == 3
    eager, fast = both(model, ids, mask, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(fast, eager) and len(hand_graphs) == 4  # the same buffers, another token choice
    model.train()  # as a GRPO rollout may call it: another compiled graph, so graphs of their own
    eager, fast = both(model, ids, mask, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(fast, eager) and len(hand_graphs) == 5


def test_a_failing_capture_finishes_the_call_a_step_at_a_time_then_leaves_graphs_to_inductor(hand_graphs, monkeypatch):
    model = tiny_model()
    ids, mask = left_padded(model.config.vocab_size)

    def no_capture(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fg, "StepGraphs", no_capture)
    eager, fast = both(model, ids, mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(fast, eager)
    assert "not permitted when stream is capturing" in model.hand_graphs_error and not model.__dict__.get(
        "fast_loop_error"
    )


def test_hand_graphs_replace_inductors_only_for_generates_default_compile_on_cuda(monkeypatch):
    model = tiny_model()
    config = copy.deepcopy(model.generation_config)
    assert fg.hand_graphed_config(model, config) is None  # CPU
    monkeypatch.setattr(DeepSeekForCausalLM, "device", property(lambda self: torch.device("cuda")))
    chosen = fg.hand_graphed_config(model, config)
    assert chosen.mode == "default" and chosen.backend == "inductor"
    for own in (
        CompileConfig(mode="max-autotune"),
        CompileConfig(backend="aot_eager"),
        CompileConfig(options={"max_autotune": True}),
    ):
        assert fg.hand_graphed_config(model, GenerationConfig(compile_config=own)) is None, own
    assert fg.hand_graphed_config(model, GenerationConfig(disable_compile=True)) is None
    monkeypatch.setattr(fg, "HAND_GRAPHS", False)
    assert fg.hand_graphed_config(model, config) is None
    monkeypatch.setattr(fg, "HAND_GRAPHS", True)
    model.__dict__["hand_graphs_error"] = "RuntimeError: capture failed"
    assert fg.hand_graphed_config(model, config) is None


@pytest.mark.gpu
def test_hand_graphed_loop_on_gpu_matches_eager_reuses_its_graphs_and_repeats_seeded_samples(monkeypatch):
    """On CUDA generate() takes the device loop by default, its step captured by hand in graphs of 1 and CHECK_EVERY
    steps; fp32, so that the greedy tokens can be compared exactly with transformers' eager loop's and with Inductor's
    CUDA graphs'. A second call reuses the graphs; sampling inside them repeats under a seed."""
    model = tiny_model().cuda()
    ids, mask = (t.cuda() for t in left_padded(model.config.vocab_size))
    eos = frequent_token(model, ids, mask, 40)
    kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=eos)
    eager = model.generate(ids, cache_implementation="dynamic", **kwargs)
    fast = model.generate(ids, **kwargs)
    assert model.__dict__.get("fast_loop_error") is None, model.fast_loop_error  # the device loop ran
    assert model.__dict__.get("hand_graphs_error") is None, model.hand_graphs_error  # with its own graphs
    graphs = model._fast_decode_buffers.graphs
    assert graphs is not None and graphs.sizes == [fg.CHECK_EVERY, 1]
    assert torch.equal(fast, eager)
    assert torch.equal(model.generate(ids, **kwargs), eager) and model._fast_decode_buffers.graphs is graphs
    samples = []
    for _ in range(2):
        torch.manual_seed(3)
        samples.append(model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=1.3,
                                      pad_token_id=0))  # fmt: skip
    assert torch.equal(*samples)
    monkeypatch.setattr(fg, "HAND_GRAPHS", False)  # Inductor's CUDA graphs, a step a call
    assert torch.equal(model.generate(ids, **kwargs), eager) and model._fast_decode_buffers.graphs is None


@pytest.mark.gpu
def test_a_failed_capture_leaves_random_draws_working_and_generate_going():
    """A step that CUDA graphs cannot capture (here one that synchronises the device) fails its capture; random
    draws afterwards still work (the generators' capture state is released: `release_generators`), and generate()
    then captures its own graphs and gives the eager loop's tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.zeros(4, device="cuda")

    def step():
        x.add_(1)
        torch.cuda.synchronize()  # forbidden while capturing: invalidates the capture

    step()
    with pytest.raises(RuntimeError):  # torch's AcceleratorError is one
        StepGraphs(step, (2, 1), key=None)
    assert torch.randn(3, device="cuda").isfinite().all()  # raised "Offset increment outside graph capture" before

    model = tiny_model().cuda()
    ids, mask = (t.cuda() for t in left_padded(model.config.vocab_size))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, cache_implementation="dynamic", **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), eager)
    assert model.__dict__.get("hand_graphs_error") is None, model.hand_graphs_error
    torch.manual_seed(5)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0)
    assert sampled.shape == (ids.shape[0], ids.shape[1] + 8)
