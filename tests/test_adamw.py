"""`kernels.adamw.TritonAdamW` against torch's AdamW: the update in float64 (CPU, its torch-op path), bf16 rounding,
a state_dict moved between the two, the fallback for options the kernel lacks, and on a GPU the Triton kernel
against torch's fused AdamW. The kernel's own arithmetic on the CPU: benchmarks/triton_interpreter_check.py."""

import copy

import pytest
import torch

from hf_deepseek.kernels.adamw import TritonAdamW, torch_update

SHAPES = ((7, 5), (3, 4, 6), (13,))


def parameters(dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)) for s in SHAPES]


def set_gradients(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1).to(p.device, p.dtype)


def groups(params):
    """Two groups with their own learning rate and weight decay."""
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1}, {"params": params[2:], "lr": 3e-3}]


def run(optimizer_class, params, steps, **kwargs):
    optimizer = optimizer_class(groups(params), betas=(0.8, 0.95), eps=1e-6, **kwargs)
    for step in range(steps):
        set_gradients(params, step)
        optimizer.step()
    return optimizer


def test_updates_match_torch_adamw_in_float64():
    ours, ref = parameters(torch.float32), parameters(torch.float64)
    run(TritonAdamW, ours, 6)
    optimizer = run(torch.optim.AdamW, ref, 6, foreach=False)
    start = parameters(torch.float64)
    for p, q, p0 in zip(ours, ref, start, strict=True):
        assert p.data.double().sub(q.data).abs().max() < 1e-5 * q.data.abs().max()
        assert q.data.sub(p0.data).abs().max() > 1e-3  # the parameters moved
    state = optimizer.state[ref[0]]
    assert float(state["step"]) == 6


def test_bf16_update_is_the_float64_update_rounded_once():
    p, g, m, v = (torch.randn(4096, dtype=torch.float64) for _ in range(4))
    v = v.abs()
    args = (1e-3, 0.9, 0.999, 1e-8, 1e-2, 0.3)
    ref = [t.clone() for t in (p, g, m, v)]
    torch_update(*ref, *args)  # float64 throughout
    bf16 = [t.to(torch.bfloat16) for t in (p, g, m, v)]
    exact = [t.double() for t in bf16]
    torch_update(*exact, *args)
    torch_update(*bf16, *args)
    # the bf16 inputs' exact result, rounded once to bf16 (up to fp32 error)
    for ours, want in zip(bf16, exact, strict=True):
        assert (ours.double() - want).abs().le(want.abs() * 2**-8 + 1e-30).all()
    assert not torch.equal(exact[0], ref[0].to(torch.bfloat16).double())  # bf16 inputs differ from float64 ones


def test_state_dict_moves_between_triton_adamw_and_torch_adamw():
    a, b = parameters(torch.float32), parameters(torch.float32)
    ours = run(TritonAdamW, a, 3)
    theirs = torch.optim.AdamW(groups(b), betas=(0.8, 0.95), eps=1e-6, foreach=False)
    for p, q in zip(a, b, strict=True):
        q.data.copy_(p.data)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # a loaded state keeps the very tensors given
    back = TritonAdamW(groups(a), betas=(0.8, 0.95), eps=1e-6)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for step in (3, 4):
        set_gradients(a, step), set_gradients(b, step)
        back.step(), theirs.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-7)
    assert float(back.state[a[0]]["step"]) == 5


def test_a_state_dict_of_torchs_fused_adamw_keeps_our_update(monkeypatch):
    """A checkpoint of torch's fused AdamW (its groups say fused=True) loads, and steps go on through our update."""
    from hf_deepseek.kernels import adamw

    a = parameters(torch.float32)
    saved = run(torch.optim.AdamW, a, 2, foreach=False).state_dict()
    for group in saved["param_groups"]:
        group["fused"] = True  # as torch's fused AdamW saves them (it runs on CUDA only)
    ours = TritonAdamW(groups(a), betas=(0.8, 0.95), eps=1e-6)
    ours.load_state_dict(copy.deepcopy(saved))
    calls = []
    monkeypatch.setattr(adamw, "torch_update", lambda *args: calls.append(args[0].shape))
    set_gradients(a, 2)
    ours.step()
    assert calls == [p.shape for p in a]


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
def test_options_the_kernel_lacks_take_torchs_step(option):
    ours, ref = parameters(torch.float32), parameters(torch.float32)
    run(TritonAdamW, ours, 3, **{option: True})
    run(torch.optim.AdamW, ref, 3, foreach=False, **{option: True})
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.data, q.data, rtol=0, atol=0)


def test_parameters_without_gradients_are_left_alone():
    params = parameters(torch.float32)
    optimizer = TritonAdamW(params, lr=0.1)
    set_gradients(params, 0)
    params[1].grad = None
    before = params[1].data.clone()
    optimizer.step()
    assert torch.equal(params[1].data, before) and params[1] not in optimizer.state
    assert float(optimizer.state[params[0]]["step"]) == 1


@pytest.mark.gpu
def test_triton_kernel_matches_torchs_fused_adamw_on_the_gpu():
    """Each step from the same state: parameters and moments one bf16 rounding apart at most (torch's fused kernel
    takes some products in double, so a few roundings differ). Free-running, those differences in the bf16 moments
    move later updates by a fraction of the learning rate: bounded, not compounding."""
    shapes = ((2048, 1408), (3, 64, 4099), (1,), (129280, 16))
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda().bfloat16()) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    free = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = TritonAdamW(ours, lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    c = TritonAdamW(free, lr=1e-2, weight_decay=0.1)
    for step in range(4):
        if step:  # our optimizer starts the step from torch's parameters and moments
            for p, q in zip(ours, ref, strict=True):
                p.data.copy_(q.data)
                for key in ("exp_avg", "exp_avg_sq"):
                    a.state[p][key].copy_(b.state[q][key])
        for p, q, r in zip(ours, ref, free, strict=True):
            p.grad = torch.randn(p.shape, generator=gen).cuda().bfloat16()
            q.grad, r.grad = p.grad.clone(), p.grad.clone()
        a.step(), b.step(), c.step()
        for p, q in zip(ours, ref, strict=True):
            pairs = [(p, q)] + [(a.state[p][k], b.state[q][k]) for k in ("exp_avg", "exp_avg_sq")]
            for x, y in pairs:
                diff = (x.float() - y.float()).abs()
                assert (diff <= y.float().abs() * 2**-7 + 1e-6).all(), step  # one bf16 rounding apart at most
                assert (diff == 0).float().mean() > 0.99, step  # the same arithmetic: nearly every element equal
    for r, q in zip(free, ref, strict=True):
        diff = (r.float() - q.float()).abs()
        # a few bf16 roundings of the parameter, plus 4 updates moved by a fraction of lr each
        assert (diff <= q.float().abs() * 2**-5 + 4 * 1e-2 * 2**-4).all() and diff.mean() < 1e-4


@pytest.mark.gpu
def test_capturable_step_replayed_from_a_cuda_graph_matches_the_host_step_on_the_gpu():
    """`capturable=True`: the step counts on the device and the bias corrections made in the kernel, so a CUDA graph
    captures the step once and each replay advances it: after four replays the float32 parameters and moments are
    the host-step optimizer's up to float32 rounding of the bias corrections (beta2 = 0.999 at step 1 included)."""
    params = parameters(torch.float32, device="cuda")
    host = [torch.nn.Parameter(p.detach().clone()) for p in params]
    graphed = TritonAdamW(groups(params), betas=(0.9, 0.999), eps=1e-8, capturable=True)
    plain = TritonAdamW(groups(host), betas=(0.9, 0.999), eps=1e-8)
    set_gradients(params, 0)
    graphed.step()  # the first step makes the state (outside the graph, as a warm-up step would)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    assert all(float(graphed.state[p]["step"]) == 1 for p in params)  # captured, not run
    for step in range(4):
        set_gradients(host, step)
        plain.step()
        if step:
            for p, q in zip(params, host, strict=True):
                p.grad.copy_(q.grad)
            graph.replay()
    assert all(graphed.state[p]["step"].device == p.device and float(graphed.state[p]["step"]) == 4 for p in params)
    for p, q in zip(params, host, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(graphed.state[p][key], plain.state[q][key], rtol=1e-6, atol=1e-9)
