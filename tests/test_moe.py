"""DeepSeekMoE: routing rules against a direct re-statement, and the grouped GEMM against the exact loop."""

import itertools

import pytest
import torch
from conftest import tiny_config

from hf_deepseek.modeling import moe
from hf_deepseek.modeling.moe import DeepSeekMoE, RoutedExperts


def reference_route(scores: torch.Tensor, bias: torch.Tensor, cfg) -> list[set[int]]:
    """Per token: among all choices of `topk_group` groups, keep the one with the largest sum of per-group
    top-2 biased scores; then the `top_k` best biased experts inside them."""
    group_size = cfg.n_routed_experts // cfg.n_group
    chosen = []
    for row in scores + bias:
        groups = row.view(cfg.n_group, group_size)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        best = max(
            itertools.combinations(range(cfg.n_group), cfg.topk_group),
            key=lambda g: group_score[list(g)].sum(),
        )
        allowed = torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in best])
        chosen.append(set(allowed[row[allowed].topk(cfg.num_experts_per_tok).indices].tolist()))
    return chosen


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [True, False])
def test_router_selects_and_weights_like_the_paper(scoring, norm):
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3, scoring_func=scoring,
                      norm_topk_prob=norm, routed_scaling_factor=2.5)  # fmt: skip
    moe = DeepSeekMoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    moe.gate.e_score_correction_bias.normal_(std=0.3)  # large enough to change which experts win
    x = torch.randn(64, cfg.hidden_size)
    indices, weights = moe.gate(x, batch_size=4)

    logits = x.double() @ moe.gate.weight.double().T
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    expected = reference_route(scores, moe.gate.e_score_correction_bias.double(), cfg)
    assert [set(row) for row in indices.tolist()] == expected
    gate = scores.gather(1, indices)  # the bias picks, the unbiased scores weigh
    if norm:
        gate = gate / gate.sum(-1, keepdim=True)
    torch.testing.assert_close(weights.double(), gate * 2.5, atol=1e-6, rtol=1e-5)
    assert moe.gate.last_expert_load.sum() == 64 * 3
    assert torch.equal(moe.gate.last_expert_load, torch.bincount(indices.flatten(), minlength=16))


def test_routed_experts_match_a_per_token_float64_loop():
    cfg = tiny_config()
    experts = RoutedExperts(cfg).double()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(10, cfg.hidden_size, dtype=torch.float64)
    indices = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, dtype=torch.float64)
    out = experts(x, indices, weights)
    for t in range(10):
        expected = 0
        for j in range(2):
            e = indices[t, j]
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            expected = expected + weights[t, j] * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(out[t], expected)


@pytest.mark.gpu
def test_grouped_gemm_matches_the_loop_on_gpu():
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, n_group=4, topk_group=2,
                      num_experts_per_tok=4)  # fmt: skip
    experts = RoutedExperts(cfg).cuda().bfloat16()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    indices = torch.randint(0, 16, (512, 4), device="cuda")
    weights = torch.rand(512, 4, device="cuda")
    assert experts._grouped_gemm_ok(x)
    grouped = experts(x, indices, weights)
    grouped.float().square().sum().backward()
    grad_grouped = experts.gate_up_proj.grad.clone()
    experts.gate_up_proj.grad = None
    experts._grouped_gemm_ok = lambda _: False
    loop = experts(x, indices, weights)
    loop.float().square().sum().backward()

    def relative_error(a, b):  # bf16 accumulation order differs; compare as a whole, not element by element
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert relative_error(grouped, loop) < 1e-2
    assert relative_error(grad_grouped, experts.gate_up_proj.grad) < 1e-2


@pytest.mark.gpu
def test_fp32_experts_under_cuda_autocast_take_the_grouped_gemm():
    experts = RoutedExperts(tiny_config(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16)).cuda()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(256, 128, device="cuda")
    indices = torch.randint(0, 16, (256, 2), device="cuda")
    weights = torch.rand(256, 2, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert experts._grouped_gemm_ok(x)
        grouped = experts(x, indices, weights)
    experts._grouped_gemm_ok = lambda _: False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loop = experts(x, indices, weights)
    assert grouped.dtype == torch.float32
    assert ((grouped - loop).norm() / loop.norm()).item() < 1e-2


def test_fp32_experts_under_bf16_autocast_take_the_grouped_gemm_in_bf16(monkeypatch):
    """Mixed precision over fp32 weights (the Trainer's `bf16=True`): the grouped GEMM in bf16, as autocast runs the
    per-expert loop's linear layers, instead of the loop with its host sync. Checked on the CPU (torch's grouped GEMM
    runs there too) against the loop under the same autocast and against float64."""
    monkeypatch.setattr(moe, "GROUPED_GEMM_DEVICES", ("cuda", "cpu"))
    cfg = tiny_config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)
    experts = RoutedExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(40, 64, requires_grad=True)
    indices = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    weights = torch.rand(40, 2)
    assert not experts._grouped_gemm_ok(x)  # fp32 without autocast: the exact loop
    runs = {}
    for name in ("grouped", "loop"):
        if name == "loop":
            monkeypatch.setattr(experts, "_grouped_gemm_ok", lambda _: False)
        experts.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert experts._grouped_gemm_ok(x) == (name == "grouped")
            out = experts(x, indices, weights)
        out.float().square().sum().backward()
        runs[name] = (out.float(), x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
    assert out.dtype == torch.float32 and experts.gate_up_proj.grad.dtype == torch.float32
    with torch.no_grad():
        want = RoutedExperts(cfg).double()
        want.load_state_dict(experts.state_dict())
        reference = want(x.double(), indices, weights.double())

    def relative_error(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert relative_error(runs["grouped"][0], reference) < 2e-2  # bf16 operands, fp32 sums
    for got, loop in zip(runs["grouped"], runs["loop"], strict=True):
        assert relative_error(got, loop) < 2e-2


def test_routed_experts_gradients_match_a_float64_reference():
    """The sort / un-sort permutations have hand-written backwards (gathers, no scatter-add): their gradients for
    the input, the gate weights and the experts must equal autograd's through plain indexing."""
    cfg = tiny_config()
    experts = RoutedExperts(cfg).double()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(12, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(12)])
    weights = torch.rand(12, 2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(12, cfg.hidden_size, dtype=torch.float64)

    (experts(x, indices, weights) * upstream).sum().backward()
    got = [t.grad.clone() for t in (x, weights, experts.gate_up_proj, experts.down_proj)]
    for t in (x, weights, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    gate, up = torch.einsum("tkod,td->tko", experts.gate_up_proj[indices], x).chunk(2, dim=-1)
    per_choice = torch.einsum("tkdi,tki->tkd", experts.down_proj[indices], torch.nn.functional.silu(gate) * up)
    ((per_choice * weights[..., None]).sum(1) * upstream).sum().backward()
    for actual, t in zip(got, (x, weights, experts.gate_up_proj, experts.down_proj), strict=True):
        torch.testing.assert_close(actual, t.grad)
