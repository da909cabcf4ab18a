"""The compiled decode step through MoE layers: one graph for a whole generation whatever experts the tokens pick.

The sorted expert loop reads each expert's row count on the host; traced, that specialised the graph on which
experts got no rows, and a 4-layer MoE model hit dynamo's recompile limit (docs/r1_add_sub.md). Under
torch.compile inference takes `moe_decode`'s static-shape paths instead: checked on the CPU with the aot_eager
backend (the same Dynamo trace generate's compiled step gets on a GPU, without Inductor's compile time).
"""

import pytest
import torch
from conftest import tiny_config
from torch._dynamo.utils import counters
from transformers.generation.configuration_utils import CompileConfig

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling import moe_decode
from hf_deepseek.modeling.moe import DeepSeekMoE, RoutedExperts


def four_moe_layer_model() -> DeepSeekForCausalLM:
    torch.manual_seed(3)
    config = tiny_config(num_hidden_layers=4, first_k_dense_replace=0, initializer_range=0.2)
    return DeepSeekForCausalLM(config).eval()


def cpu_compile_config() -> CompileConfig:
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles generate's step only on accelerators otherwise
    return config


def empty_expert_patterns(model, ids, new_tokens: int) -> set[tuple]:
    """The sets of experts that got no token, per MoE layer and eager decode step (what used to recompile)."""
    patterns = set()

    def record(module, args, output):
        if args[0].shape[0] == ids.shape[0]:  # decode steps only: one token per row
            patterns.add(tuple((module.gate.last_expert_load == 0).tolist()))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, DeepSeekMoE)]
    try:
        greedy(model, ids, new_tokens, cache_implementation="dynamic")
    finally:
        for hook in hooks:
            hook.remove()
    return patterns


def greedy(model, ids, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **kwargs,
    )  # fmt: skip


def compiled_greedy_in_one_graph(model, ids, new_tokens: int) -> torch.Tensor:
    """`greedy` with a static cache and generate's compiled step (CPU backend), asserting that the step compiled
    once as one graph without a break or a recompilation; the compiled state is cleared afterwards."""
    torch.compiler.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True, recompile_limit=1):
            tokens = greedy(model, ids, new_tokens, cache_implementation="static", compile_config=cpu_compile_config())
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch.compiler.reset()
        model.__dict__.pop("_compiled_call", None)
    return tokens


@pytest.mark.parametrize("batch", [1, 3], ids=["gathered-experts", "dense-experts"])
def test_compiled_decode_is_one_graph_whatever_the_routing(batch):
    model = four_moe_layer_model()
    ids = torch.randint(3, model.config.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(batch))
    new_tokens = 14
    assert len(empty_expert_patterns(model, ids, new_tokens)) >= 8  # the routing moves between steps
    eager = greedy(model, ids, new_tokens, cache_implementation="dynamic")

    torch.compiler.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True, recompile_limit=1):
        fast = greedy(model, ids, new_tokens, cache_implementation="static", compile_config=cpu_compile_config())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the step was compiled, once
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(fast, eager)
    torch.compiler.reset()
    model.__dict__.pop("_compiled_call", None)


def test_decode_expert_paths_under_compile(monkeypatch):
    """Which static-shape path serves a batch: none eagerly or with autograd (the sorted path), the chosen experts'
    gathered weights for a few tokens under torch.compile, every expert for more."""
    experts = RoutedExperts(tiny_config())  # 8 experts

    def path(tokens: int, grouped_gemm: bool = False):
        return moe_decode.decode_experts(experts, torch.zeros(tokens, 64), 2, grouped_gemm=grouped_gemm)

    monkeypatch.setattr(moe_decode, "tracing", lambda: True)
    with torch.no_grad():
        assert path(1) is moe_decode.gathered_experts  # 3 * 1 token * 2 choices <= 8 experts
        assert path(3) is moe_decode.dense_experts
        assert path(1, grouped_gemm=True) is None  # the grouped GEMM keeps shapes static too
    assert path(1) is None  # autograd
    monkeypatch.setattr(moe_decode, "tracing", lambda: False)
    with torch.no_grad():
        assert path(1) is None  # eager


def test_gathered_experts_match_the_per_expert_loop():
    torch.manual_seed(0)
    config = tiny_config()
    experts = RoutedExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(5, config.hidden_size)
    indices = torch.stack([torch.randperm(config.n_routed_experts)[:2] for _ in range(5)])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        gathered = moe_decode.gathered_experts(experts, x, indices, weights)
        torch.testing.assert_close(gathered, experts(x, indices, weights), rtol=1e-6, atol=1e-6)


def test_compiled_training_forward_does_not_specialise_on_the_routing():
    """With autograd the sorted loop runs eagerly inside a compiled layer (a graph break): steps with other empty
    experts reuse the graphs instead of recompiling per pattern."""
    from hf_deepseek.modeling.compile_regions import compile_for_training, uncompile

    model = four_moe_layer_model().train()
    compile_for_training(model, loss=False, backend="aot_eager")
    torch.compiler.reset()

    def train_steps(steps) -> int:
        for step in steps:
            ids = torch.randint(3, model.config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(step))
            model(ids, labels=ids).loss.backward()
        return counters["stats"]["unique_graphs"]

    try:
        with torch._dynamo.config.patch(recompile_limit=64):  # a limit reached would hide recompiles
            warm = train_steps(range(3))  # one graph per kind of layer, then shape-generic ones
            assert train_steps(range(3, 9)) == warm
    finally:
        uncompile(model)
        torch.compiler.reset()
