"""The rowwise FP8 quantiser's Triton kernels on the GPU (`fp8_triton.quantize_rowwise_triton`), bit for bit against
`fp8_numerics.quantize_rowwise` of the zero-padded operand: every kernel plan forced on activations, their transposed
views and batched expert weights, and the GPU's division (a reciprocal and an fma correction) and E4M3 cast
exhaustively over the bf16 values. (On the CPU, `benchmarks/triton_interpreter_check.py` runs the same kernels in
Triton's interpreter.)"""

import pytest
import torch
import torch.nn.functional as F

from hf_deepseek.modeling.fp8_numerics import _ceil_to, quantize_rowwise

gpu = pytest.mark.gpu


def varied(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(rows, 1, generator=gen) * 2) * torch.exp(torch.randn(1, cols, generator=gen))
    return (torch.randn(rows, cols, generator=gen) * scale).cuda()


def quantise_and_reference(view: torch.Tensor, multiple: int, pow2: bool, plan=None):
    from hf_deepseek.modeling.fp8_triton import quantize_rowwise_triton

    rows, cols = view.shape[-2:]
    rows_out, cols_out = _ceil_to(rows, multiple), _ceil_to(cols, 16)
    got = quantize_rowwise_triton(view, rows_out, cols_out, pow2, plan=plan)
    want = quantize_rowwise(F.pad(view, (0, cols_out - cols, 0, rows_out - rows)), pow2, check=False)
    return got, want


def assert_same(got, want, what: str = "") -> None:
    (q, scale), (q_ref, scale_ref) = got, want
    assert q.shape == q_ref.shape and q.is_contiguous() and scale.shape == scale_ref.shape, what
    assert torch.equal(scale, scale_ref), what
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), what


PLANS = {  # kind, block_r, block_c, num_warps, chunk, programs
    "rows": ("rows", 4, 2048, 8),
    "rows_loop": ("rows_loop", 4, 512, 8),
    "cols persistent": ("cols", 16, 512, 8, 0, 7),
    "cols per strip": ("cols", 32, 256, 8),
    "cols_split": ("cols_split", 64, 128, 8, 512),
}


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("plan_name", [None, *PLANS])
def test_every_rowwise_plan_is_bit_identical_to_the_reference(plan_name, dtype, pow2):
    from hf_deepseek.modeling.fp8_triton import RowwisePlan

    plan = RowwisePlan(*PLANS[plan_name]) if plan_name else None
    x = varied(1000, 1408, seed=1).to(dtype)
    w = varied(4 * 344, 2048, seed=2).view(4, 344, 2048).to(dtype)
    operands = {"x": (x, 16), "x^T": (x.t(), 64), "x slice": (x[:333, :500], 16), "w": (w, 1),
                "w^T": (w.transpose(1, 2), 1)}  # fmt: skip
    for name, (view, multiple) in operands.items():
        if plan_name and plan_name.startswith("rows") != (view.stride(-1) == 1):
            continue  # a transposed kernel on a row-contiguous view (or back) copies it first: nothing new
        assert_same(*quantise_and_reference(view, multiple, pow2, plan), f"{name}, {plan_name or 'default'}")


AMAX_PLANS = {  # the pair that passes amaxes on: rows_amax, then cols_amax of the transpose (forced on a matrix too)
    "default": (None, None),
    "several rows a step": (("rows_amax", 4, 2048, 8, 64), ("cols_amax", 16, 512, 8, 512)),
    "one row a step": (("rows_amax", 1, 2048, 4, 8), ("cols_amax", 64, 128, 8, 128)),
}


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("plans", list(AMAX_PLANS))
def test_amaxes_passed_on_quantise_both_orientations_bit_identically(plans, dtype, pow2):
    """`quantize_rowwise_amax_triton` quantises the rows and takes each column's amax (exactly `column_amax`,
    zero in the padding), and `quantize_rowwise_triton` of the transposed view given those amaxes equals the
    reference bit for bit: activations (padded rows and columns), a slice, batched expert weights; NaN and inf
    reach the amaxes as they reach the separate passes' (an inf scale). By default a single matrix takes no amaxes
    (`rowwise_amax_plan`: None), and is quantised as `quantize_rowwise_triton` would."""
    from hf_deepseek.modeling.fp8_numerics import RowwisePlan, column_amax
    from hf_deepseek.modeling.fp8_triton import quantize_rowwise_amax_triton, quantize_rowwise_triton

    plan_a, plan_b = (RowwisePlan(*p) if p else None for p in AMAX_PLANS[plans])
    x = varied(1000, 1408, seed=5).to(dtype)
    w = varied(4 * 344, 2048, seed=6).view(4, 344, 2048).to(dtype)
    for name, view, multiple in (("x", x, 16), ("x slice", x[:333, :500], 64), ("w", w, 1)):
        rows, cols = view.shape[-2:]
        rows_out, cols_out = (rows if view.dim() == 3 else _ceil_to(rows, multiple)), _ceil_to(cols, 16)
        q, scale, amax = quantize_rowwise_amax_triton(view, rows_out, cols_out, pow2, plan=plan_a)
        want = quantize_rowwise(F.pad(view, (0, cols_out - cols, 0, rows_out - rows)), pow2, check=False)
        assert_same((q, scale), want, name)
        if plan_a is None and view.dim() == 2:
            assert amax is None, name
            continue
        assert torch.equal(amax[..., :cols], column_amax(view)) and not amax[..., cols:].any(), name
        t = view.transpose(-1, -2)
        t_rows_out = cols if view.dim() == 3 else _ceil_to(cols, 16)
        got = quantize_rowwise_triton(t, t_rows_out, _ceil_to(rows, 16), pow2, plan=plan_b, amax=amax)
        assert_same(got, quantise_and_reference(t, 16 if view.dim() == 2 else 1, pow2)[1], f"{name}^T")
    bad = x.clone()
    bad[3, 5], bad[7, 9] = float("nan"), float("inf")
    forced = RowwisePlan("rows_amax", 1, 2048, 4, 16)  # a single matrix takes no amaxes by default
    q, scale, amax = quantize_rowwise_amax_triton(bad, 1008, 1408, pow2, plan=forced)
    assert amax[5].isnan() and amax[9].isinf() and scale[3].isinf() and scale[7].isinf()
    scale_t = quantize_rowwise_triton(bad.t(), 1408, 1008, pow2, amax=amax)[1]
    assert scale_t[5].isinf() and scale_t[9].isinf() and scale_t[10:].isfinite().all()


@gpu
def test_hopper_experts_passing_amaxes_on_equal_separate_passes_on_the_gpu():
    """The rowwise routed experts on the Hopper backend (Triton quantisers) give the same outputs and gradients, bit
    for bit, with W^T quantised from the amaxes of the pass over W's rows or by its own pass."""
    from conftest import tiny_config

    from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training
    from hf_deepseek.modeling.fp8_triton import HopperBackend
    from hf_deepseek.modeling.moe import RoutedExperts

    class SeparatePasses(HopperBackend):
        def quantize_weight_and_amax_t(self, w):
            return (*self.quantize_weight(w), None)

    recipe = FP8Recipe(scaling="rowwise")
    backends = (HopperBackend(recipe), SeparatePasses(recipe))
    assert backends[0].quantize_weight_and_amax_t(torch.ones(8, 64, 256, device="cuda"))[2] is not None
    cfg = tiny_config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2)
    torch.manual_seed(10)
    experts = convert_to_fp8_training(RoutedExperts(cfg).to("cuda", torch.bfloat16), recipe)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.06)
    torch.nn.init.normal_(experts.down_proj, std=0.09)
    tokens = torch.randn(1000, 256, device="cuda").to(torch.bfloat16).requires_grad_(True)
    indices = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(1000)])
    weights = torch.rand(1000, 2, device="cuda")
    results = []
    for backend in backends:
        experts.fp8_backend = backend
        out = experts(tokens, indices, weights)
        results.append((out, *torch.autograd.grad(out, [tokens, experts.gate_up_proj, experts.down_proj], out)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_division_and_cast_are_exact_over_all_bf16_values(transposed, pow2):
    """Each row: an amax (every bf16 mantissa, at exponents near the 1e-12 floor, around 1 and near the top) and
    every bf16 value from amax * 2^-26 up to amax (below, the quotient is under E4M3's smallest step), random
    signs, signed zeros and subnormals: every (mantissa, mantissa, exponent gap) of the division for bf16 inputs,
    through the default plan of the row-contiguous operand or of its transposed copy."""
    mantissas = torch.arange(128, dtype=torch.int32)
    rows = []
    for exponent in (88, 100, 127, 160, 253):
        amax = ((exponent << 7) | mantissas).to(torch.int16).view(torch.bfloat16).float()  # [128]
        gaps = torch.arange(exponent - 26, exponent + 1, dtype=torch.int32)
        values = ((gaps[:, None] << 7) | mantissas[None, :]).flatten().to(torch.int16).view(torch.bfloat16).float()
        block = torch.where(values[None, :] <= amax[:, None], values[None, :], 0.0)
        rows.append(torch.cat([amax[:, None], block], dim=1))
    x = torch.cat(rows)
    gen = torch.Generator().manual_seed(3)
    x = x * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)
    x[:, -4:] = torch.tensor([0.0, -0.0, 1e-40, -1e-39])
    x = x.to(torch.bfloat16).cuda()
    view = x.t().contiguous().t() if transposed else x
    assert_same(*quantise_and_reference(view, 16, pow2))


@gpu
def test_a_nan_gives_its_row_an_inf_scale_and_leaves_the_others():
    x = varied(64, 3000, seed=4).to(torch.bfloat16)
    x[5, 2000] = float("nan")
    for view, row in ((x, 5), (x.t(), 2000)):
        (q, scale), _ = quantise_and_reference(view, 16, False)
        _, (q_ref, scale_ref) = quantise_and_reference(torch.nan_to_num(view, nan=0.0), 16, False)
        keep = torch.arange(scale.shape[0], device=scale.device) != row
        assert torch.isinf(scale[row]).all()
        assert_same((q[keep], scale[keep]), (q_ref[keep], scale_ref[keep]))


def test_the_plans_follow_the_operand_layout():
    """Which kernel runs (CPU: plain Python on shapes, on the meta device): whole rows in registers for
    row-contiguous operands (one row a program at 2048 columns, the sweep's best), a persistent grid over strips for
    transposed expert weights, a split reduction along the tokens; and the pair that passes amaxes on, for batched
    weights only: rows looping over enough rows a program to keep the atomics few, transposes in chunks of 512
    columns (the sweep's best); a single matrix keeps its passes apart."""
    from hf_deepseek.modeling.fp8_numerics import rowwise_amax_plan, rowwise_from_amax_plan, rowwise_plan

    def plan(shape, transposed=False, pick=rowwise_plan):
        t = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        t = t.transpose(-1, -2) if transposed else t
        return pick(t, t.shape[-2], _ceil_to(t.shape[-1], 16))

    assert plan((16384, 2048))[:4] == ("rows", 1, 2048, 4) and plan((16384, 4096))[:4] == ("rows", 2, 4096, 8)
    assert plan((64, 2816, 2048)).kind == "rows" and plan((40, 20000)).kind == "rows_loop"
    gate_up_t = plan((64, 2816, 2048), transposed=True)
    assert gate_up_t.kind == "cols" and gate_up_t.programs * 2816 * gate_up_t.block_r * 2 <= 24 << 20
    tokens_t = plan((16384, 2048), transposed=True)
    assert tokens_t.kind == "cols_split" and tokens_t.chunk % tokens_t.block_c == 0
    assert plan((300, 1000), transposed=True).kind == "cols"  # a short reduction: one launch

    w_amax = plan((64, 2816, 2048), pick=rowwise_amax_plan)
    assert w_amax.kind == "rows_amax" and w_amax.chunk % w_amax.block_r == 0
    assert 64 * 2816 // w_amax.chunk >= 4 * 132 and 2816 // w_amax.chunk <= 16  # every SM busy, few atomics a column
    for single in ((16384, 2048), (2048, 10944), (1, 2816, 2048), (64, 40, 20000)):  # a matrix; rows too wide
        assert plan(single, pick=rowwise_amax_plan) is None, single
    gate_up_t = plan((64, 2816, 2048), transposed=True, pick=rowwise_from_amax_plan)
    assert gate_up_t[:5] == ("cols_amax", 64, 128, 8, 512)
    assert plan((4, 100, 300), transposed=True, pick=rowwise_from_amax_plan).chunk == 128  # a short reduction
