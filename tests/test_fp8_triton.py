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
    """Which kernel runs (CPU only: shapes on the meta device): whole rows in registers for row-contiguous operands,
    a persistent grid over strips for transposed expert weights, a split reduction along the tokens."""
    pytest.importorskip("triton")
    from hf_deepseek.modeling.fp8_triton import rowwise_plan

    def plan(shape, transposed=False):
        t = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        t = t.transpose(-1, -2) if transposed else t
        return rowwise_plan(t, t.shape[-2], _ceil_to(t.shape[-1], 16))

    assert plan((16384, 2048))[:4] == ("rows", 4, 2048, 8)
    assert plan((64, 2816, 2048)).kind == "rows" and plan((40, 20000)).kind == "rows_loop"
    gate_up_t = plan((64, 2816, 2048), transposed=True)
    assert gate_up_t.kind == "cols" and gate_up_t.programs * 2816 * gate_up_t.block_r * 2 <= 24 << 20
    tokens_t = plan((16384, 2048), transposed=True)
    assert tokens_t.kind == "cols_split" and tokens_t.chunk % tokens_t.block_c == 0
    assert plan((300, 1000), transposed=True).kind == "cols"  # a short reduction: one launch
