"""The project's FP8 Triton kernels run in Triton's interpreter on the CPU, against their torch references: the rowwise
quantiser (`fp8_triton.quantize_rowwise_triton`, every kernel plan, bit for bit against `quantize_rowwise` of the
padded operand, with the reference's arithmetic and with the GPU's fma and E4M3 cast emulated: `gpu_arithmetic`), the
routed experts' FP8 weight-gradient quantiser (`fp8_triton.quantize_segment_columns_triton`, bit for bit against
`quantize_segment_columns`) and the weight-only FP8 matrix-vector kernels of decode (`kernels/_moe_gemv_triton.py`,
relative error against the float64 product with the dequantised weights, next to the bf16 kernel's own error against
its reference), and the
expert-grouped decode kernels (`kernels/_moe_grouped_gemv_triton.py`, bf16, FP8 and fp32 weights against float64;
the interpreter's bf16 `tl.dot` patched to read values, not bits: `bf16_dot`), the rows kernel of the dense
layers' decode rows (`kernels/_linear_rows_triton.py`), decode attention's per-head absorbed products
(`kernels/_head_matmul_triton.py`), a decode step's MLA front (`kernels/_mla_front_triton.py`), the kernel of two
linear layers of one input (`_moe_gemv_triton._pair_kernel`) and the one of an RMSNorm in the launch of the linear
layer after it (`_moe_gemv_triton._norm_gemv_kernel`), and the training step's routed-expert kernels that write FP8
rows beside their bf16 results (`modeling/fp8_moe_triton.py`; for the blockwise recipe, the whole MLP's function
against the layer-by-layer path with the Hopper backend's Triton quantisers and GEMMs), and AdamW's update writing
the FP8 copy of the new
weight (`modeling/fp8_adamw_triton.py`: W's rows, or W's 128x128 blocks and W^T's), and the training loss's
per-chunk cross-entropy and gradient (`kernels/_cross_entropy_triton.py`, against `output_loss._chunk_terms` and
float64).

Needs a Python with torch and triton (a CUDA build of torch brings triton; no GPU is used) and numpy below 2.4
(triton 3.6's interpreter converts 1-element arrays to scalars, which numpy 2.4 refuses):

    TRITON_INTERPRET=1 python benchmarks/triton_interpreter_check.py [--json out.json]
"""

import argparse
import contextlib
import json
import os
import sys
from fractions import Fraction

import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: the kernels run in Triton's interpreter, on the CPU")

from hf_deepseek import DeepSeekConfig  # noqa: E402
from hf_deepseek.kernels import _moe_gemv_triton, moe_gemv  # noqa: E402
from hf_deepseek.kernels.fp8_blocks import BLOCK, dequantize_blocks, dequantize_experts  # noqa: E402
from hf_deepseek.kernels.moe_gemv_config import split_chunk  # noqa: E402
from hf_deepseek.modeling.fp8 import FP8InferenceExperts, FP8InferenceLinear  # noqa: E402
from hf_deepseek.modeling.fp8_numerics import (  # noqa: E402
    _ceil_to,
    quantize_blocks,
    quantize_rowwise,
    quantize_segment_columns,
)
from hf_deepseek.modeling.fp8_triton import (  # noqa: E402
    RowwisePlan,
    quantize_rowwise_triton,
    quantize_segment_columns_triton,
    rowwise_plan,
)
from hf_deepseek.modeling.moe import RoutedExperts  # noqa: E402


def varied(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols) * torch.exp(torch.randn(rows, 1) * 2) * torch.exp(torch.randn(1, cols))


@contextlib.contextmanager
def gpu_arithmetic():
    """Make the interpreter compute as the GPU does where the quantiser's FAST path relies on it: a fused
    multiply-add rounded once (the interpreter's `tl.fma` is x * y + z, rounded twice) and the float32 -> E4M3 cast
    rounded to nearest even, saturating (`cvt.rn.satfinite.e4m3x2.f32`; the interpreter's cast does not round to
    nearest even). fma: float64 products of float32 values are exact, and a TwoSum error term settles the sums that
    land on a float32 midpoint; `exact_fma_check` tests it against rational arithmetic."""
    import numpy as np
    from triton.runtime import interpreter

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return original_fma(self, x, y, z)
        return interpreter.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar)

    def convert_float(data, src, dst, rounding):
        if not (src == interpreter.tl.float32 and dst == interpreter.tl.float8e4nv):
            return original_convert(data, src, dst, rounding)
        clipped = torch.from_numpy(np.clip(np.asarray(data, np.float32), -448.0, 448.0))  # keeps NaN
        return clipped.to(torch.float8_e4m3fn).view(torch.uint8).numpy()

    original_fma, original_convert = interpreter.InterpreterBuilder.create_fma, interpreter._convert_float
    interpreter.InterpreterBuilder.create_fma, interpreter._convert_float = create_fma, convert_float
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_fma, interpreter._convert_float = original_fma, original_convert


def fma32(a, b, c):
    """float32 fma(a, b, c), one rounding (to nearest even), of float32 numpy arrays."""
    import numpy as np

    a64, b64, c64 = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    with np.errstate(all="ignore"):  # NaN and inf (a NaN row's values) stay NaN and inf, as on the GPU
        p = a64 * b64  # exact: 24 x 24 bits
        s = p + c64
        t = s - p
        err = (p - (s - t)) + (c64 - t)  # s + err == p + c exactly
        r = np.asarray(s.astype(np.float32))
        r64 = r.astype(np.float64)
        up = np.nextafter(r, np.float32(np.inf)).astype(np.float64)
        down = np.nextafter(r, np.float32(-np.inf)).astype(np.float64)
        tie = ((s == (r64 + up) / 2) | (s == (r64 + down) / 2)) & (err != 0)  # s on a midpoint, p + c off it
    if tie.any():
        r[tie] = np.nextafter(s[tie], np.where(err[tie] > 0, np.inf, -np.inf)).astype(np.float32)
    return r


def exact_fma_check(n: int = 3000) -> bool:
    """`fma32` against exact rational arithmetic, on random operands and on sums placed near float32 midpoints."""
    import numpy as np

    def round32(v: Fraction) -> float:  # round to nearest even float32 (normal range)
        if v == 0:
            return 0.0
        sign, v = (-1 if v < 0 else 1), abs(v)
        e = v.numerator.bit_length() - v.denominator.bit_length()
        e += 1 if Fraction(2) ** (e + 1) <= v else -1 if Fraction(2) ** e > v else 0
        ulp = Fraction(2) ** (e - 23)
        k = v / ulp
        n_ = k.numerator // k.denominator
        if k - n_ > Fraction(1, 2) or (k - n_ == Fraction(1, 2) and n_ % 2):
            n_ += 1
        return sign * float(n_ * ulp)

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    near = -(a[: n // 2].astype(np.float64) * b[: n // 2]) + rng.integers(-4, 5, n // 2) * 2.0**-26
    c[: n // 2] = near.astype(np.float32)
    got = fma32(a, b, c)
    want = [
        round32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))) for x, y, z in zip(a, b, c, strict=True)
    ]
    return bool(np.array_equal(got, np.array(want, np.float32)))


def each_arithmetic():
    """("reference", False), then ("gpu", True) with the GPU's fma and E4M3 cast emulated (`gpu_arithmetic`): the
    arithmetic a check runs under, and the `fast` flag of the kernels' GPU path."""
    yield "reference", False
    with gpu_arithmetic():
        yield "gpu", True


def _same(got, want) -> bool:
    return torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


def rowwise_quantiser() -> dict[str, bool]:
    """Bit-identical to the reference (`quantize_rowwise` of the zero-padded operand), with the reference's
    arithmetic (what the interpreter runs by default) and with the GPU's (`gpu_arithmetic`, the FAST path):
    activations, transposed views, long rows, batched and transposed weights under the default plans; then each
    kernel forced on small operands (a persistent "cols" grid looping over strips, "cols_split" with several
    chunks, "rows_loop", batched weights through both transposed kernels), a view with no contiguous dimension,
    single rows and columns, signed zeros, subnormals and values on E4M3 rounding midpoints, and a row with a NaN
    (its scale inf, the other rows unchanged)."""
    results = {"fma32 emulation exact (vs fractions)": exact_fma_check()}
    plans = {
        "cols persistent": RowwisePlan("cols", 16, 32, 4, programs=3),
        "cols_split": RowwisePlan("cols_split", 16, 32, 4, chunk=64),
        "rows_loop": RowwisePlan("rows_loop", 4, 64, 4),
    }
    for arithmetic, fast in each_arithmetic():
        torch.manual_seed(0)
        for dtype in (torch.bfloat16, torch.float32):
            for pow2 in (False, True):
                x, long_rows = varied(300, 1000).to(dtype), varied(40, 2600).to(dtype)
                w = varied(600, 330).view(3, 200, 330).to(dtype)
                for name, view, multiple in (("x", x, 16), ("x^T", x.t(), 16), ("x slice", x[:37, :51], 64),
                                             ("long rows", long_rows, 16), ("long rows^T", long_rows.t(), 16),
                                             ("w", w, 1), ("w^T", w.transpose(1, 2), 1)):  # fmt: skip
                    results[f"{name} {str(dtype)[6:]} pow2={pow2} [{arithmetic}]"] = _check(
                        view, multiple, pow2, None, fast
                    )
        for dtype in (torch.bfloat16, torch.float32):
            small, ws = varied(150, 72).to(dtype), varied(3 * 40, 56).view(3, 40, 56).to(dtype)
            for pow2 in (False, True):
                for plan_name, plan in plans.items():
                    operands = (("x", small), ("w", ws)) if plan_name == "rows_loop" else (
                        ("x^T", small.t()), ("w^T", ws.transpose(1, 2)))  # fmt: skip
                    for name, view in operands:
                        key = f"{name} {plan_name} {str(dtype)[6:]} pow2={pow2} [{arithmetic}]"
                        results[key] = _check(view, 16 if name[0] == "x" else 1, pow2, plan, fast)
                key = f"{{}} {str(dtype)[6:]} pow2={pow2} [{arithmetic}]"
                results[key.format("no contiguous dim")] = _check(small[::2, ::3], 16, pow2, None, fast)
                results[key.format("one row")] = _check(small[:1], 16, pow2, None, fast)
                results[key.format("one column^T")] = _check(small[:, :1].t(), 16, pow2, None, fast)
                results[key.format("one column")] = _check(small[:, :1], 16, pow2, None, fast)
                special = special_values(dtype)
                results[key.format("special values")] = _check(special, 16, pow2, None, fast)
                results[key.format("special values^T")] = _check(special.t().contiguous().t(), 16, pow2,
                                                                None, fast)  # fmt: skip
                results[key.format("NaN row")] = _nan_row(dtype, pow2, fast)
    return results


def segment_columns_quantiser() -> dict[str, bool]:
    """The experts' weight-gradient operands (`fp8_triton.quantize_segment_columns_triton`) bit for bit against
    `quantize_segment_columns`, with the reference's arithmetic and the GPU's: 128-row blocks of three experts (one
    with no rows, one over three blocks), 72 columns (a partial column tile), special values among expert 0's rows,
    and NaN in the blocks of no expert (which nothing may read: their q^T columns zero); and the laid-out rows read
    through a row index from the token rows, as the experts' first projection's weight gradient reads them."""
    results = {}
    block_expert = torch.tensor([0, 0, 2, 2, 2, -1, -1], dtype=torch.int32)
    for arithmetic, fast in each_arithmetic():
        torch.manual_seed(1)
        for dtype in (torch.bfloat16, torch.float32):
            for pow2 in (False, True):
                t = varied(7 * BLOCK, 72).to(dtype)
                t[130:136, :48] = special_values(dtype)
                t[5 * BLOCK :] = float("nan")
                got = quantize_segment_columns_triton(t, block_expert, 3, pow2, fast)
                want = quantize_segment_columns(t, block_expert, 3, pow2, check=False)
                results[f"segment columns {str(dtype)[6:]} pow2={pow2} [{arithmetic}]"] = _same(got, want)
                # the same laid-out rows read through an index from 300 token rows (300: a zero row)
                tokens = t[:300].clone()
                index = torch.randint(0, 301, (7 * BLOCK,))
                got = quantize_segment_columns_triton(tokens, block_expert, 3, pow2, fast, row_index=index)
                want = quantize_segment_columns(tokens, block_expert, 3, pow2, False, row_index=index)
                gathered = F.pad(tokens, (0, 0, 0, 1)).index_select(0, index)
                laid_out = quantize_segment_columns(gathered, block_expert, 3, pow2, check=False)
                key = f"segment columns through an index {str(dtype)[6:]} pow2={pow2} [{arithmetic}]"
                results[key] = _same(got, want) and _same(want, laid_out)
    return results


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Rows of signed zeros, subnormals, tiny values beside large ones (quotients below E4M3's smallest step, and
    underflowing the fma's residual), and values whose quotients land on E4M3 rounding midpoints."""
    rows = torch.zeros(6, 48)
    rows[0, ::2] = -0.0
    rows[1] = torch.tensor([1e-40, -1e-39, 3e-41, -0.0] * 12)
    rows[1, 0] = 1.0
    rows[2] = torch.logspace(-30, 0, 48) * torch.tensor([1.0, -1.0] * 24)
    e4m3 = torch.arange(0, 126, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    midpoints = (e4m3[:-1] + e4m3[1:]) / 2
    rows[3] = torch.cat([torch.tensor([448.0]), midpoints[torch.randperm(midpoints.numel())[:47]]]) / 7
    rows[4] = torch.cat([torch.tensor([448.0]), midpoints[-47:]]) * 3.0
    rows[5] = torch.cat([torch.tensor([-1e30]), -midpoints[:47]])
    return rows.to(dtype)


def _quantise(view, multiple, pow2, plan, fast):
    rows, cols = view.shape[-2:]
    rows_out, cols_out = _ceil_to(rows, multiple), _ceil_to(cols, 16)
    plan = (plan or rowwise_plan(view, rows_out, cols_out))._replace(fast=fast)
    got = quantize_rowwise_triton(view, rows_out, cols_out, pow2, plan=plan)
    return got, F.pad(view, (0, cols_out - cols, 0, rows_out - rows))


def _check(view, multiple, pow2, plan, fast) -> bool:
    got, padded = _quantise(view, multiple, pow2, plan, fast)
    return _same(got, quantize_rowwise(padded, pow2, check=False))


def _nan_row(dtype, pow2, fast) -> bool:
    """A NaN in row 7 of x (row 7 of x^T: its column 7): that row's scale is inf (the finite check's signal, as the
    old kernels gave), every other row as the reference quantises x with the NaN replaced by 0."""
    x = varied(40, 100).to(dtype)
    x[7, 33] = float("nan")
    ok = True
    for view, row in ((x, 7), (x.t(), 33)):
        (q, scale), padded = _quantise(view, 16, pow2, None, fast)
        q_ref, scale_ref = quantize_rowwise(torch.nan_to_num(padded, nan=0.0), pow2, check=False)
        keep = torch.arange(scale.shape[0]) != row
        ok &= bool(torch.isinf(scale[row]).all()) and _same((q[keep], scale[keep]), (q_ref[keep], scale_ref[keep]))
    return ok


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def fp8_experts(hidden: int, inter: int) -> FP8InferenceExperts:
    """16 routed experts with unit-variance outputs, quantised to FP8 with their block scales."""
    config = DeepSeekConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=16)
    experts = RoutedExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, hidden**-0.5)
        experts.down_proj.normal_(0, inter**-0.5)
    return FP8InferenceExperts.from_experts(experts, config)


def weight_only_kernels() -> dict[str, float]:
    """FP8 experts and linear layers (bf16 activations) against float64, beside the bf16 experts kernel."""
    results = {}
    for inter, tokens, hidden in ((160, 3, 256), (1408, 2, 640)):
        torch.manual_seed(inter)
        fp8 = fp8_experts(hidden, inter)
        x = torch.randn(tokens, hidden).to(torch.bfloat16)
        indices = torch.stack([torch.randperm(16)[:6] for _ in range(tokens)])
        weights = torch.rand(tokens, 6).softmax(dim=-1)
        gate_up, down = fp8.dequantized_weights()
        want = moe_gemv.reference(x.double(), indices, weights.double(), gate_up.double(), down.double())
        scales = dict(gate_up_scale=fp8.gate_up_proj_scale_inv, down_scale=fp8.down_proj_scale_inv)
        got = _moe_gemv_triton.launch(x, indices, weights, fp8.gate_up_proj, fp8.down_proj, **scales)
        bf16 = _moe_gemv_triton.launch(x, indices, weights, gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
        want_bf16 = moe_gemv.reference(x, indices, weights, gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
        results[f"fp8 experts, I={inter}, {tokens} tokens"] = relative_error(got, want)
        results[f"bf16 experts kernel vs its reference, I={inter}"] = relative_error(bf16, want_bf16)
    for k, n, rows in ((320, 200, 3), (2048, 576, 1), (512, 1000, 4)):
        torch.manual_seed(k)
        layer = FP8InferenceLinear.from_linear(torch.nn.Linear(k, n, bias=False))
        x = torch.randn(rows, k).to(torch.bfloat16)
        got = _moe_gemv_triton.launch_linear_fp8(x, layer.weight, layer.weight_scale_inv)
        want = x.double() @ layer.dequantized(torch.float64).weight.T
        results[f"fp8 linear [{n}, {k}], {rows} rows"] = relative_error(got, want)
        # the bf16 store holds the fp32 sums (fp32 x: fp32 stores) rounded: on a GPU to nearest even, as .to() rounds
        # (tests/test_moe_gemv.py checks it there); the interpreter's conversion truncates
        sums = _moe_gemv_triton.launch_linear_fp8(x.float(), layer.weight, layer.weight_scale_inv)
        truncated = (sums.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
        exact = torch.equal(got, truncated)
        results[f"fp8 linear [{n}, {k}] stores its fp32 sums as bf16 (1: not)"] = 0.0 if exact else 1.0
        dense = layer.dequantized(torch.bfloat16).weight.detach()  # the same kernel over a bf16 weight
        got = _moe_gemv_triton.launch_linear(x, dense)
        results[f"bf16 linear [{n}, {k}], {rows} rows"] = relative_error(got, x.double() @ dense.double().T)
    return results


# ---- the fused MoE router (hf_deepseek/kernels/moe_routing.py) ----------------------------------------------------
# A separate section: `moe_router()`, which the main block runs, prints, saves ("moe_router_as_torch") and counts in
# the exit status.

ROUTER_CASES = {  # name: (tokens, config overrides, fused), the logits' hidden size 256
    "V3 64 experts, 8 groups, top-6, batch 1": (1, dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                                                         topk_group=4), True),
    "V3, 3 tokens, cuBLAS-style logits": (3, dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                                                  topk_group=4), False),
    "V3 unnormalised, 40 tokens (3 token blocks)": (40, dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                                                             topk_group=4, norm_topk_prob=False), False),
    "V3, 20 tokens fused (2 token blocks)": (20, dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                                                      topk_group=4), True),
    "one group": (5, dict(n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1), True),
    "groups of one expert": (4, dict(n_routed_experts=8, num_experts_per_tok=2, n_group=8, topk_group=4), True),
    "160 experts, groups of 20, top-3 groups": (6, dict(n_routed_experts=160, num_experts_per_tok=6, n_group=8,
                                                        topk_group=3), True),
    "top-1": (3, dict(n_routed_experts=16, num_experts_per_tok=1, n_group=4, topk_group=2), True),
    "V2 group_limited_greedy softmax": (7, dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                                topk_method="group_limited_greedy", scoring_func="softmax",
                                                norm_topk_prob=False, routed_scaling_factor=16.0), True),
    "greedy softmax": (5, dict(n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
                               topk_method="greedy", scoring_func="softmax", norm_topk_prob=False), True),
}  # fmt: skip


def moe_router() -> dict[str, bool]:
    """The router kernel (`moe_routing.launch`) against the torch routing of the logits it computed: indices and
    counts identical, weights identical where the scores are the same computation (sigmoid: the interpreter's
    kernel uses numpy's exp, so the reference scores with numpy too) and unnormalised, else within 4e-7 relative
    (normalisation and softmax sum in another order); logits within 1e-5 of F.linear's fp32 product; the kernel's
    counters back to zero; exact ties (all scores equal) broken towards the lower index; and given logits of 300
    tokens (training's routing, no counts) routed to torch's choice."""
    import numpy as np

    from hf_deepseek.kernels import moe_routing

    results = {}
    for name, (tokens, overrides, fuse) in ROUTER_CASES.items():
        torch.manual_seed(tokens)
        config = DeepSeekConfig(hidden_size=256, **overrides)
        weight, bias = torch.randn(config.n_routed_experts, 256) / 16, torch.randn(config.n_routed_experts) / 10
        x = torch.randn(tokens, 256).to(torch.bfloat16)
        args = moe_routing.routing_args(config)
        indices, weights, counts, logits = moe_routing.launch(x, weight, bias, *args, fuse=fuse)
        if config.scoring_func == "sigmoid":  # as the interpreted kernel: 1 / (1 + exp(-x)) in fp32, numpy's exp
            one = np.float32(1)
            scores = torch.from_numpy(one / (one + np.exp(-logits.numpy())))
            want_indices, want_weights = moe_routing.select_experts(scores, bias, args)
        else:
            want_indices, want_weights, _ = moe_routing.route_reference(logits, bias, *args)
        normalised = config.norm_topk_prob and config.num_experts_per_tok > 1
        if config.scoring_func == "sigmoid" and not normalised:
            weights_ok = torch.equal(weights, want_weights)
        else:
            weights_ok = torch.allclose(weights, want_weights, rtol=4e-7, atol=0)
        results[name] = (
            torch.equal(indices, want_indices)
            and torch.equal(counts, torch.bincount(want_indices.flatten(), minlength=config.n_routed_experts))
            and weights_ok
            and torch.allclose(logits, F.linear(x.float(), weight), rtol=1e-5, atol=1e-5)
            and not moe_routing._semaphores(x.device).any()
        )
    for name, (_, overrides, _) in ROUTER_CASES.items():  # training's routing of given logits: 300 tokens, no counts
        torch.manual_seed(300)
        config = DeepSeekConfig(hidden_size=256, **overrides)
        logits, bias = torch.randn(300, config.n_routed_experts), torch.randn(config.n_routed_experts) / 10
        args = moe_routing.routing_args(config)
        indices = moe_routing.launch(None, None, bias, *args, logits=logits)[0]
        if config.scoring_func == "sigmoid":
            one = np.float32(1)
            scores = torch.from_numpy(one / (one + np.exp(-logits.numpy())))
        else:
            scores = moe_routing.score(logits, args)
        results[f"{name}, 300 tokens' given logits"] = (
            torch.equal(indices, moe_routing.choose_experts(scores, bias, args))
            and not moe_routing._semaphores(logits.device).any()
        )
    for tokens, dim, dtype in ((1, 256, torch.bfloat16), (5, 320, torch.bfloat16), (3, 256, torch.float32)):
        # the residual sum and RMSNorm in the launch (`add_norm`), bf16 stored with the GPU's rounding: the sums
        # equal the eager op's, the normalised rows RMSNorm's output but for rsqrt (numpy's here: in bf16 at most 1%
        # of the values one rounding apart, in fp32 within 1e-6), the routing that of the rows the kernel normalised
        torch.manual_seed(dim + tokens)
        config = DeepSeekConfig(hidden_size=dim, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4)
        weight, bias = torch.randn(64, dim) / 16, torch.randn(64) / 10
        residual, delta = (torch.randn(tokens, dim).to(dtype) for _ in range(2))
        norm_weight = (1 + torch.randn(dim) / 4).to(dtype)
        args = moe_routing.routing_args(config)
        with gpu_store_rounding():
            indices, weights, counts, logits, hidden, normed = moe_routing.launch(
                residual, weight, bias, *args, fuse=True, add_norm=(delta, norm_weight, 1e-6)
            )
        want_hidden, want_normed = moe_routing.add_norm_reference(residual, delta, norm_weight, 1e-6)
        if dtype == torch.bfloat16:
            normed_ok = (normed != want_normed).float().mean().item() <= 0.01
        else:
            normed_ok = torch.allclose(normed, want_normed, rtol=1e-6, atol=1e-6)
        one = np.float32(1)
        scores = torch.from_numpy(one / (one + np.exp(-logits.numpy())))
        want_indices = moe_routing.select_experts(scores, bias, args)[0]
        results[f"residual sum and norm in the launch, {tokens} x {dim} {str(dtype)[6:]}"] = (
            torch.equal(hidden, want_hidden)
            and normed_ok
            and torch.allclose(logits, F.linear(normed.float(), weight), rtol=1e-5, atol=1e-5)
            and torch.equal(indices, want_indices)
            and torch.equal(counts, torch.bincount(want_indices.flatten(), minlength=64))
            and not moe_routing._semaphores(residual.device).any()
        )
    config = DeepSeekConfig(hidden_size=256, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4)
    zeros = torch.zeros(64, 256), torch.zeros(64)  # every score 0.5: every group and expert tied
    tied = moe_routing.launch(torch.randn(2, 256), *zeros, *moe_routing.routing_args(config))
    results["exact ties: the lowest indices"] = tied[0].tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    return results


# ---- split-K / pipelined variants of the matrix-vector kernels (kernels/_moe_gemv_triton.py, `KernelConfig`) ------
# A separate section: `moe_gemv_variants()`, which the main block runs, prints, saves ("moe_gemv_variants") and counts
# in the exit status (each variant within 1e-2 of float64 and of the default configuration's result to 2e-2; in fp32
# throughout, within 1e-5 of float64).

MOE_GEMV_VARIANTS = [(16, 128, 4, 3, None), (32, 128, 4, 4, 2), (16, 256, 8, 2, None), (8, 64, 2, 1, 3)]
MOE_GEMV_VARIANTS += [(4, 512, 4, 1, None), (2, 1024, 4, 1, None)]  # whole-K: one masked step over K
# (gate/up kernel's, down kernel's) configurations apart (`launch(..., down_config=)`): h split over d into a down
# kernel without split-K, the reverse, and both split differently
MOE_GEMV_DOWN_VARIANTS = [
    ((16, 128, 4, 3, None), (32, 64, 4, 1, 3)),
    ((8, 64, 2, 1, 3), (16, 128, 4, 2, None)),
    ((32, 128, 4, 4, 2), (16, 256, 8, 2, None)),
    ((32, 256, 4, 1, None), (32, 256, 4, 2, None)),  # the FP8 defaults (TUNED_FP8, TUNED_FP8_DOWN)
]


def moe_gemv_variants() -> dict[str, bool]:
    results = {}
    torch.manual_seed(7)
    hidden, inter, tokens = 384, 320, 2  # partial BLOCK_K steps and split chunks, a partial 128-block of scales
    fp8 = fp8_experts(hidden, inter)
    gate_up, down = (w.to(torch.bfloat16) for w in fp8.dequantized_weights())
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    indices = torch.stack([torch.randperm(16)[:6] for _ in range(tokens)])
    weights = torch.rand(tokens, 6).softmax(dim=-1)
    want = moe_gemv.reference(x.double(), indices, weights.double(), gate_up.double(), down.double())
    scales = dict(gate_up_scale=fp8.gate_up_proj_scale_inv, down_scale=fp8.down_proj_scale_inv)
    layer = FP8InferenceLinear.from_linear(torch.nn.Linear(640, 200, bias=False))
    rows = torch.randn(3, 640).to(torch.bfloat16)
    want_linear = rows.double() @ layer.dequantized(torch.float64).weight.T
    f32 = (x.float(), indices, weights, gate_up.float(), down.float())  # fp32 throughout: a sharp check of the sums
    want_f32 = moe_gemv.reference(*(t.double() if t.is_floating_point() else t for t in f32))
    mlp = (x.float(), gate_up[0, :inter].float(), gate_up[0, inter:].float())  # a SwiGLU MLP's gate and up, fp32
    want_mlp = torch.nn.functional.silu(mlp[0].double() @ mlp[1].double().T) * (mlp[0].double() @ mlp[2].double().T)
    base = {
        "bf16": _moe_gemv_triton.launch(x, indices, weights, gate_up, down),
        "fp8": _moe_gemv_triton.launch(x, indices, weights, fp8.gate_up_proj, fp8.down_proj, **scales),
        "linear": _moe_gemv_triton.launch_linear_fp8(rows, layer.weight, layer.weight_scale_inv),
    }
    for cfg in MOE_GEMV_VARIANTS:
        got = {
            "bf16": _moe_gemv_triton.launch(x, indices, weights, gate_up, down, cfg),
            "fp8": _moe_gemv_triton.launch(x, indices, weights, fp8.gate_up_proj, fp8.down_proj, cfg, **scales),
            "linear": _moe_gemv_triton.launch_linear_fp8(rows, layer.weight, layer.weight_scale_inv, cfg),
            "fp32": _moe_gemv_triton.launch(*f32, cfg),
            # the down kernel summing each token's top-k itself (without split-K; ignored with it)
            "bf16 summed": _moe_gemv_triton.launch(x, indices, weights, gate_up, down, cfg, sum_top_k=True),
            "fp8 summed": _moe_gemv_triton.launch(
                x, indices, weights, fp8.gate_up_proj, fp8.down_proj, cfg, sum_top_k=True, **scales
            ),
            "fp32 summed": _moe_gemv_triton.launch(*f32, cfg, sum_top_k=True),
            "fp32 gate/up": _moe_gemv_triton.launch_gate_up(*mlp, cfg),  # two matrices, one launch
        }
        for name, out in got.items():
            if name.startswith("fp32"):
                error = relative_error(out, want_mlp if name == "fp32 gate/up" else want_f32)
                print(f"  moe_gemv {name} {cfg}: error {error:.2e}")
                results[f"{name} {cfg}"] = error < 1e-5
                continue
            error = relative_error(out, want_linear if name == "linear" else want)
            drift = relative_error(out, base[name.split()[0]])
            print(f"  moe_gemv {name} {cfg}: error {error:.2e}, vs default config {drift:.2e}")
            results[f"{name} {cfg}"] = error < 1e-2 and drift < 2e-2
    for cfg, down_cfg in MOE_GEMV_DOWN_VARIANTS:
        apart = dict(down_config=down_cfg)
        fp8_args = (x, indices, weights, fp8.gate_up_proj, fp8.down_proj, cfg)
        got = {
            "fp32": _moe_gemv_triton.launch(*f32, cfg, **apart),
            "fp32 summed": _moe_gemv_triton.launch(*f32, cfg, sum_top_k=True, **apart),
            "fp8": _moe_gemv_triton.launch(*fp8_args, **scales, **apart),
            "bf16 per pair": _moe_gemv_triton.launch(x, indices, weights, gate_up, down, cfg, per_pair=True, **apart),
        }
        for name, out in got.items():
            if name == "bf16 per pair":  # [N, slots, d]: the down kernel's own split gives the slots
                out = out.sum(dim=1).to(torch.bfloat16)
            error = relative_error(out, want_f32 if name.startswith("fp32") else want)
            bound = 1e-5 if name.startswith("fp32") else 1e-2
            print(f"  moe_gemv {name} gate/up {cfg}, down {down_cfg}: error {error:.2e}")
            results[f"{name} gate/up {cfg} down {down_cfg}"] = error < bound
    return results


# ---- the expert-grouped decode kernels (hf_deepseek/kernels/_moe_grouped_gemv_triton.py, `GroupedConfig`) ---------
# A separate section: `moe_grouped_gemv_kernels()`, which the main block runs, prints, saves ("moe_grouped_gemv") and
# counts in the exit status: bf16 and FP8 weights within 1e-2 of float64 and of the per-pair kernels' result to 2e-2,
# fp32 throughout within 1e-5 of float64; tl.dot (BLOCK_T 16, 32) and the broadcast product (BLOCK_T 4).

GROUPED_VARIANTS = [None, (32, 16, 64, 4, 2), (4, 16, 128, 4, None)]


@contextlib.contextmanager
def bf16_dot():
    """The interpreter keeps bf16 tensors as their uint16 bits and its `tl.dot` multiplies those bits: convert bf16
    operands to float32 first (exact, as the tensor cores read them; the products and sums in fp32)."""
    import numpy as np
    from triton.runtime import interpreter

    tl = interpreter.tl

    def as_float32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    original = interpreter.InterpreterBuilder.create_dot
    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original


def sort_pairs_kernel() -> dict[str, bool]:
    """The grouped kernels' one-launch sort of the pairs by expert: the same order and offsets as
    `moe_routing.sort_pairs` (torch's stable argsort), from one pair to 1,020 (batch 170 at top-6 of 256)."""
    from hf_deepseek.kernels import _moe_grouped_gemv_triton, moe_routing

    results = {}
    generator = torch.Generator().manual_seed(5)
    for tokens, top_k, experts in [(1, 1, 4), (20, 4, 16), (32, 6, 64), (33, 8, 256), (170, 6, 256)]:
        indices = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
        indices[: tokens // 2, 0] = 1  # a crowded expert
        order, offsets = _moe_grouped_gemv_triton.sort_pairs(indices, experts)
        want_order, want_offsets = moe_routing.sort_pairs(indices, experts)
        results[f"sort_pairs {tokens}x{top_k} of {experts}"] = torch.equal(order.long(), want_order) and torch.equal(
            offsets, want_offsets
        )
    return results


def moe_grouped_gemv_kernels() -> dict[str, bool]:
    """20 tokens at top-4 of 16 experts, every token choosing expert 1 (two chunks of 16 pairs), experts 8-15 none;
    hidden 384 and width 320: partial K steps and a partial 128-block of scales; and the sort of the pairs."""
    from hf_deepseek.kernels import _moe_grouped_gemv_triton

    results = sort_pairs_kernel()
    print("".join(f"  {name}: {'as torch' if same else 'DIFFERENT'}\n" for name, same in results.items()), end="")
    torch.manual_seed(11)
    hidden, inter, tokens = 384, 320, 20
    fp8 = fp8_experts(hidden, inter)
    gate_up, down = fp8.dequantized_weights()
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    others = torch.stack([torch.tensor([0, *range(2, 8)])[torch.randperm(7)[:3]] for _ in range(tokens)])
    indices = torch.cat([torch.ones(tokens, 1, dtype=torch.long), others], dim=1)
    weights = torch.rand(tokens, 4).softmax(dim=-1)
    bf16 = (x, indices, weights, gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
    f32 = (x.float(), indices, weights, gate_up, down)
    scales = dict(gate_up_scale=fp8.gate_up_proj_scale_inv, down_scale=fp8.down_proj_scale_inv)
    fp8_args = (x, indices, weights, fp8.gate_up_proj, fp8.down_proj)
    want = {  # float64 from the weights each kind holds; the per-pair kernels' results beside them
        "bf16": moe_gemv.reference(*(t.double() if t.is_floating_point() else t for t in bf16)),
        "fp8": moe_gemv.reference(*(t.double() if t.is_floating_point() else t for t in f32)),
    }
    want["fp32"] = want["fp8"]
    with bf16_dot():
        per_pair = {"bf16": _moe_gemv_triton.launch(*bf16), "fp8": _moe_gemv_triton.launch(*fp8_args, **scales)}
        for cfg in GROUPED_VARIANTS:
            got = {
                "bf16": _moe_grouped_gemv_triton.launch(*bf16, cfg),
                "fp8": _moe_grouped_gemv_triton.launch(*fp8_args, cfg, **scales),
                "fp32": _moe_grouped_gemv_triton.launch(*f32, cfg),
            }
            for name, out in got.items():
                error = relative_error(out, want[name])
                if name == "fp32":
                    print(f"  moe_grouped_gemv {name} {cfg}: error {error:.2e}")
                    results[f"{name} {cfg}"] = error < 1e-5 and out.dtype == torch.float32
                    continue
                drift = relative_error(out, per_pair[name])
                print(f"  moe_grouped_gemv {name} {cfg}: error {error:.2e}, vs the per-pair kernels {drift:.2e}")
                results[f"{name} {cfg}"] = error < 1e-2 and drift < 2e-2 and out.dtype == torch.bfloat16
    return results


# ---- the linear layers' decode rows (hf_deepseek/kernels/_linear_rows_triton.py, `moe_gemv_config.GroupedConfig`) ---
# A separate section: `linear_rows_kernel()`, which the main block runs, prints, saves ("linear_rows") and counts in
# the exit status: FP8 weights with bf16 and fp16 rows, and bf16 weights with bf16 rows, within 1e-2 of float64 and,
# stored with the GPU's rounding (`gpu_store_rounding`), within 1e-3 of the ops' torch path (fp32 sums rounded once);
# FP8 weights with fp32 rows within 1e-5 of float64; tl.dot (BLOCK_T 16, 32) and the broadcast product (BLOCK_T 4);
# partial blocks of rows, weight rows and K (not a multiple of 128).

LINEAR_ROWS_CASES = [  # (rows, N, K, config)
    (20, 200, 320, None), (20, 200, 320, (16, 32, 64, 4, 2)), (20, 200, 320, (4, 16, 128, 4, None)),
    (5, 200, 320, (4, 16, 128, 4, None)), (5, 200, 320, (16, 16, 128, 4, 3)), (33, 136, 1408, None),
]  # fmt: skip


@contextlib.contextmanager
def gpu_store_rounding():
    """The interpreter converts float32 to bf16 by truncation; the GPU's `.to(tl.bfloat16)` (cvt.rn.bf16.f32) rounds
    to nearest even, as torch's `.to()` does: convert as torch does."""
    import numpy as np
    from triton.runtime import interpreter

    def convert_float(data, src, dst, rounding):
        if not (src == interpreter.tl.float32 and dst == interpreter.tl.bfloat16):
            return original(data, src, dst, rounding)
        return torch.from_numpy(np.asarray(data, np.float32)).to(torch.bfloat16).view(torch.int16).numpy()

    original = interpreter._convert_float
    interpreter._convert_float = convert_float
    try:
        yield
    finally:
        interpreter._convert_float = original


def linear_rows_kernel() -> dict[str, bool]:
    """The rows kernel (`_linear_rows_triton.launch`) with FP8 and bf16 weights against float64 and against the ops'
    torch path (`linear_rows.linear_rows_fp8`, `linear_rows.linear_rows` on the CPU)."""
    from hf_deepseek.kernels import _linear_rows_triton, linear_rows

    results = {}
    with bf16_dot(), gpu_store_rounding():
        for rows, n, k, cfg in LINEAR_ROWS_CASES:
            torch.manual_seed(rows * n + k)
            layer = FP8InferenceLinear.from_linear(torch.nn.Linear(k, n, bias=False))
            bf16 = layer.dequantized(torch.float32).weight.to(torch.bfloat16)
            weights = {  # (the kernel's weight and scale, the weight in float64)
                "fp8": ((layer.weight, layer.weight_scale_inv), layer.dequantized(torch.float64).weight),
                "bf16": ((bf16, None), bf16.double()),
            }
            x = torch.randn(rows, k)
            bf16_x, fp16_x = torch.bfloat16, torch.float16
            for kind, dtype in [("fp8", bf16_x), ("fp8", fp16_x), ("fp8", torch.float32), ("bf16", bf16_x)]:
                (weight, scale), full = weights[kind]
                xd = x.to(dtype)
                got = _linear_rows_triton.launch(xd, weight, scale, cfg)
                error = relative_error(got, xd.double() @ full.T)
                name = f"{kind} weight, {str(dtype)[6:]} {rows}x{k} @ [{n}, {k}]^T {cfg}"
                if dtype == torch.float32:
                    print(f"  linear_rows {name}: error {error:.2e}")
                    results[name] = error < 1e-5 and got.dtype == dtype
                    continue
                torch_path = (
                    linear_rows.linear_rows_fp8(xd, weight, scale)
                    if scale is not None
                    else linear_rows.linear_rows(xd, weight)
                )
                drift, differ = relative_error(got, torch_path), (got != torch_path).sum().item()
                print(f"  linear_rows {name}: error {error:.2e}, vs the op's torch path {drift:.2e} ({differ} differ)")
                results[name] = error < 1e-2 and drift < 1e-3 and got.dtype == dtype
    return results


# ---- decode attention's absorbed products (hf_deepseek/kernels/_head_matmul_triton.py) -------------------------------
# A separate section: `head_matmul_kernel()`, which the main block runs, prints, saves ("head_matmul") and counts in
# the exit status: W_UK [H, nope, r] and W_UV [H, v, r] (transposed) as strided views of one weight, bf16 rows within
# 1e-2 of float64 and, stored with the GPU's rounding, within 1e-3 of the op's torch path; fp32 rows within 1e-5 of
# float64; the broadcast product (1-8 rows) and tl.dot (9 rows and more), partial blocks of rows and outputs; a
# strided tail (the query's roped part) joined on by the same launch, exactly.

HEAD_MATMUL_CASES = [(1, 16, 128, 512), (5, 16, 128, 512), (9, 4, 64, 40), (20, 3, 128, 96)]  # (rows, H, nope, r)


def head_matmul_kernel() -> dict[str, bool]:
    """The per-head kernel (`_head_matmul_triton.launch`, its default plan) against float64 and the op's torch path
    (`head_matmul.head_matmul` on the CPU)."""
    from hf_deepseek.kernels import _head_matmul_triton, head_matmul

    results = {}
    with bf16_dot(), gpu_store_rounding():
        for rows, heads, nope, rank in HEAD_MATMUL_CASES:
            torch.manual_seed(rows * heads + rank)
            weight = torch.randn(heads, 2 * nope, rank) * rank**-0.5
            for dtype in (torch.bfloat16, torch.float32):
                w = weight.to(dtype)
                products = {  # name: (x, w as the attention passes it)
                    "W_UK": (torch.randn(rows, heads, nope).to(dtype), w[:, :nope]),
                    "W_UV": (torch.randn(rows, heads, rank).to(dtype), w[:, nope:].transpose(1, 2)),
                }
                for kind, (x, wk) in products.items():
                    got = _head_matmul_triton.launch(x, wk)
                    error = relative_error(got, torch.einsum("thk,hkn->thn", x.double(), wk.double()))
                    name = f"{kind} {str(dtype)[6:]} {rows} rows x {heads} heads, {list(wk.shape)}"
                    if dtype == torch.float32:
                        print(f"  head_matmul {name}: error {error:.2e}")
                        results[name] = error < 1e-5 and got.dtype == dtype
                        continue
                    drift = relative_error(got, head_matmul.head_matmul(x, wk))
                    print(f"  head_matmul {name}: error {error:.2e}, vs the op's torch path {drift:.2e}")
                    results[name] = error < 1e-2 and drift < 1e-3 and got.dtype == dtype
                    tail = torch.randn(rows, 1, heads, 16).to(dtype)[:, 0]  # a roped part joined on, strided
                    joined = _head_matmul_triton.launch(x, wk, tail)
                    results[f"{name} + a [{rows}, {heads}, 16] tail"] = torch.equal(
                        joined, torch.cat([got, tail], dim=-1)
                    )
    return results


# ---- a decode step's MLA front in one launch (`_mla_front_triton._front_kernel`) -----------------------------------
# A separate section: `mla_front_kernel()`, which the main block runs, prints, saves ("mla_front") and counts in the
# exit status: the joined query within 1e-2 of float64 (bf16; 1e-5 in fp32) and 1e-3 of the op's torch path, the
# cache entry likewise at the length and nowhere else, the length counted and returned per row as int32; both RoPE
# layouts, the broadcast product (up to 8 rows) and tl.dot (16 rows a program, a partial block), a kv_a that is a
# strided slice of a wider output.

MLA_FRONT_CASES = [(1, 16, 128, 512, 64, True), (3, 4, 64, 40, 16, False), (20, 3, 128, 96, 32, True)]
# (rows, H, nope, r, rope, interleaved)


def float64_front(q, kv_a, cos, sin, norm_weight, eps, w_uk, interleaved):
    """The joined query and the cache entry in float64, as the eager model computes them (`apply_rope`, RMSNorm)."""
    from hf_deepseek.modeling.attention import apply_rope

    nope, rank = w_uk.shape[1], w_uk.shape[2]
    q, kv_a, cos, sin = q.double(), kv_a.double(), cos.double(), sin.double()
    q_latent = torch.einsum("bhk,hkr->bhr", q[..., :nope], w_uk.double())
    q_rope = apply_rope(q[:, :, None, nope:], cos[:, None], sin[:, None], interleaved)[:, :, 0]
    latent = kv_a[:, :rank]
    normed = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    k_rope = apply_rope(kv_a[:, None, None, rank:], cos[:, None], sin[:, None], interleaved)[:, 0, 0]
    return torch.cat([q_latent, q_rope], -1), torch.cat([normed, k_rope], -1)


def mla_front_kernel() -> dict[str, bool]:
    """The front kernel (`_mla_front_triton.launch`) against float64 and the op's torch path (`mla_front.reference`)."""
    from hf_deepseek.kernels import _mla_front_triton, mla_front

    results = {}
    with bf16_dot(), gpu_store_rounding():
        for rows, heads, nope, rank, rope, interleaved in MLA_FRONT_CASES:
            for dtype in (torch.bfloat16, torch.float32):
                torch.manual_seed(rows * heads + rank)
                q = torch.randn(rows, heads, nope + rope).to(dtype)
                kv_a = torch.randn(rows, 7 + rank + rope).to(dtype)[:, 7:]  # a slice of a wider output
                angles = torch.rand(rows, rope // 2) * 6
                cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
                norm_weight = (1 + torch.randn(rank) / 4).to(dtype)
                w_uk = (torch.randn(heads, nope + 48, rank) * nope**-0.5).to(dtype)[:, :nope]  # kv_b's view
                length = 5
                caches = [torch.zeros(rows, 12, rank + rope, dtype=dtype) for _ in range(2)]
                lengths = [torch.tensor(length) for _ in range(2)]
                got, got_lengths = _mla_front_triton.launch(q, kv_a, cos, sin, norm_weight, 1e-6, w_uk, caches[0],
                                                            lengths[0], interleaved)  # fmt: skip
                ref, ref_lengths = mla_front.reference(q, kv_a, cos, sin, norm_weight, 1e-6, w_uk, caches[1],
                                                       lengths[1], interleaved)  # fmt: skip
                want_q, want_entry = float64_front(q, kv_a, cos, sin, norm_weight, 1e-6, w_uk, interleaved)
                entry = caches[0][:, length]
                others = torch.cat([caches[0][:, :length], caches[0][:, length + 1 :]], 1)
                q_error, entry_error = relative_error(got, want_q), relative_error(entry, want_entry)
                drift = max(relative_error(got, ref), relative_error(entry, caches[1][:, length]))
                name = f"{str(dtype)[6:]} {rows} rows x {heads} heads, nope {nope}, r {rank}, rope {rope}" + (
                    " interleaved" if interleaved else " halves"
                )
                errors = f"query error {q_error:.2e}, entry {entry_error:.2e}, vs torch path {drift:.2e}"
                print(f"  mla_front {name}: {errors}")
                bound = 1e-5 if dtype == torch.float32 else 1e-2
                results[name] = (
                    q_error < bound and entry_error < bound and drift < (1e-6 if dtype == torch.float32 else 1e-3)
                    and got.dtype == dtype and not others.any() and int(lengths[0]) == length + 1
                    and torch.equal(got_lengths, ref_lengths) and got_lengths.tolist() == [length + 1] * rows
                )  # fmt: skip
    return results


# ---- two linear layers of one input in one launch (`_moe_gemv_triton._pair_kernel`, MLA's q_a and kv_a) -------------
# A separate section: `linear_pair_kernel()`, which the main block runs, prints, saves ("linear_pair") and counts in
# the exit status: bf16, stored with the GPU's rounding, within 1e-2 of float64 and 1e-3 of the op's torch path;
# partial blocks of either matrix's rows.

LINEAR_PAIR_CASES = [(1536, 576, 256), (100, 36, 320), (8, 8, 64)]  # (N1, N2, K)


MLA_CHAIN_CASES = [(128, 64, 4, 32, 128, 32, True), (96, 40, 3, 64, 64, 16, False)]  # (d, q rank, H, nope, r, rope,
# interleaved)


def mla_chain_kernel() -> dict[str, bool]:
    """The chain kernel (`_mla_chain_triton.launch`, its phases as three launches: the interpreter runs programs one
    after another, so the grid barrier never opens here) against the three kernels it joins, launched apart: the
    same bits, the same cache entry and length; and against the op's torch path within bf16 rounding."""
    from hf_deepseek.kernels import _mla_chain_triton, _mla_front_triton, _moe_gemv_triton, mla_chain

    results = {}
    with bf16_dot(), gpu_store_rounding():
        for dim, rank_q, heads, nope, rank, rope, interleaved in MLA_CHAIN_CASES:
            torch.manual_seed(dim + rank)
            bf16 = torch.bfloat16
            x = torch.randn(1, dim).to(bf16)
            w_qa, w_kva = (
                (torch.randn(rank_q, dim) * dim**-0.5).to(bf16),
                (torch.randn(rank + rope, dim) * dim**-0.5).to(bf16),
            )
            w_qb = (torch.randn(heads * (nope + rope), rank_q) * rank_q**-0.5).to(bf16)
            g_q, g_kv = (1 + torch.randn(rank_q) / 4).to(bf16), (1 + torch.randn(rank) / 4).to(bf16)
            angles = torch.rand(1, rope // 2) * 6
            cos, sin = angles.cos().to(bf16), angles.sin().to(bf16)
            w_uk = (torch.randn(heads, nope + 16, rank) * nope**-0.5).to(bf16)[:, :nope]
            caches = [torch.zeros(1, 9, rank + rope, dtype=bf16) for _ in range(3)]
            lengths = [torch.tensor(4) for _ in range(3)]
            got, got_len = _mla_chain_triton.launch(x, w_qa, w_kva, g_q, 1e-6, w_qb, cos, sin, g_kv, 1e-6, w_uk,
                                                    caches[0], lengths[0], interleaved, phased=True,
                                                    programs=3)  # fmt: skip
            qkv = _moe_gemv_triton.launch_linear_pair(x, w_qa, w_kva)
            q = _moe_gemv_triton.launch_norm_linear(qkv[:, :rank_q], g_q, 1e-6, w_qb).view(1, heads, nope + rope)
            apart, apart_len = _mla_front_triton.launch(q, qkv[:, rank_q:], cos, sin, g_kv, 1e-6, w_uk, caches[1],
                                                        lengths[1], interleaved)  # fmt: skip
            ref, _ = mla_chain.reference(x, w_qa, w_kva, g_q, 1e-6, w_qb, cos, sin, g_kv, 1e-6, w_uk, caches[2],
                                         lengths[2], interleaved)  # fmt: skip
            drift = relative_error(got, ref)
            name = f"d {dim}, q rank {rank_q}, {heads} heads, nope {nope}, r {rank}, rope {rope}"
            print(f"  mla_chain {name}: same as the kernels apart {torch.equal(got, apart)}, vs torch path {drift:.2e}")
            results[name] = bool(
                torch.equal(got, apart) and torch.equal(caches[0], caches[1]) and torch.equal(got_len, apart_len)
                and int(lengths[0]) == int(lengths[1]) == 5 and drift < 1e-2 and caches[0][:, 4].any()
            )  # fmt: skip
    return results


def linear_pair_kernel() -> dict[str, bool]:
    """The pair kernel (`_moe_gemv_triton.launch_linear_pair`, the default linear configuration) against float64
    and the op's torch path (`moe_gemv.linear_gemv_pair` on the CPU), bf16 and FP8 weights; and the gate/up kernel
    over two FP8 layers (`launch_gate_up` with their scales, `moe_gemv.gate_up_gemv_fp8`)."""
    results = {}
    with gpu_store_rounding():
        for n1, n2, k in LINEAR_PAIR_CASES:
            torch.manual_seed(n1 + n2 + k)
            x, first, second = (torch.randn(r, k).to(torch.bfloat16) for r in (1, n1, n2))
            got = _moe_gemv_triton.launch_linear_pair(x, first, second)
            want = torch.cat([x.double() @ first.double().T, x.double() @ second.double().T], dim=-1)
            error, drift = relative_error(got, want), relative_error(got, moe_gemv.linear_gemv_pair(x, first, second))
            print(f"  linear_pair [{n1}, {k}] + [{n2}, {k}]: error {error:.2e}, vs the op's torch path {drift:.2e}")
            results[f"[{n1}, {k}] + [{n2}, {k}]"] = error < 1e-2 and drift < 1e-3 and got.shape == (1, n1 + n2)
            # FP8 layers (128x128 block scales, `linear_gemv_pair_fp8`): each half the FP8 layer's own kernel's
            # result bit for bit, within FP8's tolerance of float64 with the dequantised weights
            fp8 = [quantize_blocks(varied(n, k) / k**0.5) for n in (n1, n2)]
            got = _moe_gemv_triton.launch_linear_pair(x, fp8[0][0], fp8[1][0], first_scale=fp8[0][1],
                                                      second_scale=fp8[1][1])  # fmt: skip
            own = torch.cat([_moe_gemv_triton.launch_linear_fp8(x, q, sc) for q, sc in fp8], dim=-1)
            want = torch.cat([x.double() @ dequantize_blocks(q, sc).double().T for q, sc in fp8], dim=-1)
            error, same = relative_error(got, want), torch.equal(got, own)
            print(f"  linear_pair fp8 [{n1}, {k}] + [{n2}, {k}]: error {error:.2e}, its layers' own kernels' {same}")
            results[f"fp8 [{n1}, {k}] + [{n2}, {k}]"] = error < 1e-2 and same
            # a SwiGLU MLP's two FP8 layers [N1, K] in the gate/up kernel (`gate_up_gemv_fp8`), each with its own
            # scales: SiLU(gate) * up within FP8's tolerance of float64, and of the op's torch path
            gate, up = (quantize_blocks(varied(n1, k) / k**0.5) for _ in range(2))
            got = _moe_gemv_triton.launch_gate_up(x, gate[0], up[0], gate_scale=gate[1], up_scale=up[1])
            g, u = (x.double() @ dequantize_blocks(q, sc).double().T for q, sc in (gate, up))
            error = relative_error(got, torch.nn.functional.silu(g) * u)
            drift = relative_error(got, moe_gemv.gate_up_gemv_fp8(x, gate[0], gate[1], up[0], up[1]))
            print(f"  gate_up fp8 2 x [{n1}, {k}]: error {error:.2e}, vs the op's torch path {drift:.2e}")
            results[f"fp8 gate/up 2 x [{n1}, {k}]"] = error < 1e-2 and drift < 1e-2 and got.shape == (1, n1)
    return results


# ---- an RMSNorm in the launch of the linear layer after it (`_moe_gemv_triton._norm_gemv_kernel`, MLA's q_a norm) ----
# A separate section: `norm_linear_kernel()`, which the main block runs, prints, saves ("norm_linear") and counts in
# the exit status: bf16 rows (a strided slice, as the q_a / kv_a pair's output), stored with the GPU's rounding,
# within 1e-2 of float64 and 1e-3 of the op's torch path (RMSNorm's roundings, then the product).

NORM_LINEAR_CASES = [(1536, 3072, 576), (320, 200, 0), (64, 48, 8)]  # (K, N, columns after the row's K)


def norm_linear_kernel() -> dict[str, bool]:
    """The norm-prologue kernel (`_moe_gemv_triton.launch_norm_linear`) against float64 and `moe_gemv.norm_linear_gemv`
    on the CPU."""
    results = {}
    with gpu_store_rounding():
        for k, n, extra in NORM_LINEAR_CASES:
            torch.manual_seed(k + n)
            x = torch.randn(1, k + extra).to(torch.bfloat16)[:, :k]
            g = (torch.rand(k) + 0.5).to(torch.bfloat16)
            weight = (torch.randn(n, k) / k**0.5).to(torch.bfloat16)
            got = _moe_gemv_triton.launch_norm_linear(x, g, 1e-6, weight)
            want = moe_gemv.rms_norm(x, g, 1e-6).double() @ weight.double().T
            error, drift = relative_error(got, want), relative_error(got, moe_gemv.norm_linear_gemv(x, g, 1e-6, weight))
            name = f"[{n}, {k}], row stride {k + extra}"
            print(f"  norm_linear {name}: error {error:.2e}, vs the op's torch path {drift:.2e}")
            results[name] = error < 1e-2 and drift < 1e-3
            # an FP8 weight with 128x128 block scales (`norm_linear_gemv_fp8`), against float64 with the
            # dequantised weight and the op's torch path
            q, scale = quantize_blocks(varied(n, k) / k**0.5)
            got = _moe_gemv_triton.launch_norm_linear(x, g, 1e-6, q, scale=scale)
            want = moe_gemv.rms_norm(x, g, 1e-6).double() @ dequantize_blocks(q, scale).double().T
            op = moe_gemv.norm_linear_gemv_fp8(x, g, 1e-6, q, scale)
            error, drift = relative_error(got, want), relative_error(got, op)
            print(f"  norm_linear fp8 {name}: error {error:.2e}, vs the op's torch path {drift:.2e}")
            results[f"fp8 {name}"] = error < 1e-2 and drift < 1e-3
            # the pair kernel of the norm's output (`norm_linear_gemv_pair`: a layer's input norm with q_a and kv_a),
            # the weight's rows split in two layers, bf16 and FP8
            n1 = n // 3
            got = _moe_gemv_triton.launch_norm_linear_pair(x, g, 1e-6, weight[:n1], weight[n1:])
            want = moe_gemv.rms_norm(x, g, 1e-6).double() @ weight.double().T
            op = moe_gemv.norm_linear_gemv_pair(x, g, 1e-6, weight[:n1], weight[n1:])
            error, drift = relative_error(got, want), relative_error(got, op)
            print(f"  norm_linear pair {name}: error {error:.2e}, vs the op's torch path {drift:.2e}")
            results[f"pair {name}"] = error < 1e-2 and drift < 1e-3 and got.shape == (1, n)
            halves = [quantize_blocks(varied(rows, k) / k**0.5) for rows in (n1, n - n1)]
            (q1, s1), (q2, s2) = halves
            got = _moe_gemv_triton.launch_norm_linear_pair(x, g, 1e-6, q1, q2, first_scale=s1, second_scale=s2)
            want = (
                moe_gemv.rms_norm(x, g, 1e-6).double()
                @ torch.cat([dequantize_blocks(q, sc) for q, sc in halves]).double().T
            )
            op = moe_gemv.norm_linear_gemv_pair_fp8(x, g, 1e-6, q1, s1, q2, s2)
            error, drift = relative_error(got, want), relative_error(got, op)
            print(f"  norm_linear pair fp8 {name}: error {error:.2e}, vs the op's torch path {drift:.2e}")
            results[f"pair fp8 {name}"] = error < 1e-2 and drift < 1e-3
    return results


# ---- a MoE layer's shared MLP as more pairs of the routed experts' launches (`launch(..., shared=...)`) -------------
# A separate section: `shared_pairs_kernels()`, which the main block runs, prints, saves ("shared_pairs") and counts
# in the exit status: per-pair outputs within 1e-2 of float64 (bf16 weights, fp32 within 1e-5) and the sum within
# 1e-3 of the op's torch path (`moe_gemv.routed_and_shared_experts_gemv` on the CPU); 2 shared slices, 1-3 tokens.

SHARED_PAIR_CASES = [(2, 1, None), (2, 3, None), (1, 2, (16, 128, 4, 4, 2))]  # (slices, tokens, config)


def split_slots(inter: int, cfg) -> int:
    """Slots a pair takes in a per-pair output under launch configuration `cfg`: its partial sums over the down
    kernel's chunks of I with split-K, else one."""
    if cfg is None or len(cfg) < 4 or cfg[3] == 1:
        return 1
    return -(-inter // split_chunk(inter, cfg[3], cfg[1]))


def shared_pairs_kernels() -> dict[str, bool]:
    """Routed experts at top-4 of 16 plus a shared MLP of `slices` x the experts' width in the same two launches."""
    results = {}
    hidden, inter = 384, 320
    with gpu_store_rounding():
        for slices, tokens, cfg in SHARED_PAIR_CASES:
            torch.manual_seed(slices * 10 + tokens)
            gate_up = (torch.randn(16, 2 * inter, hidden) / hidden**0.5).to(torch.bfloat16)
            down = (torch.randn(16, hidden, inter) / inter**0.5).to(torch.bfloat16)
            shapes = ((slices * inter, hidden), (slices * inter, hidden), (hidden, slices * inter))
            shared = [(torch.randn(*shape) / shape[1] ** 0.5).to(torch.bfloat16) for shape in shapes]
            x = torch.randn(tokens, hidden).to(torch.bfloat16)
            indices = torch.stack([torch.randperm(16)[:4] for _ in range(tokens)])
            weights = torch.rand(tokens, 4).softmax(dim=-1)
            for dtype in (torch.bfloat16, torch.float32):
                args = (x.to(dtype), indices, weights, gate_up.to(dtype), down.to(dtype))
                extra = tuple(t.to(dtype) for t in shared)
                got = _moe_gemv_triton.launch(*args, cfg, per_pair=True, shared=extra)
                want = moe_gemv.reference_with_shared(*(t.double() if t.is_floating_point() else t
                                                        for t in (*args, *extra)))  # fmt: skip
                op = moe_gemv.routed_and_shared_experts_gemv(*args, *extra).sum(dim=1)
                # split-K gives each pair's partial sums over chunks of I: compare the sums, and unsplit the pairs
                error = relative_error(got.sum(dim=1), want.sum(dim=1))
                if cfg is None:
                    error = max(error, relative_error(got, want))
                drift = relative_error(got.sum(dim=1), op)
                name = f"{slices} slices, {tokens} tokens, {str(dtype)[6:]}, config {cfg}"
                print(f"  shared pairs {name}: error {error:.2e}, vs the op's torch path {drift:.2e}")
                tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                shape_ok = got.shape == (tokens, (4 + slices) * split_slots(inter, cfg), hidden)
                results[name] = error < tolerance and drift < max(tolerance, 1e-3) and shape_ok
    return results


def fp8_shared_pairs_kernels() -> dict[str, bool]:
    """`shared_pairs_kernels` with FP8 routed experts and an FP8 shared MLP (128x128 block scales, the experts' width
    a multiple of 128), against float64 with the dequantised weights."""
    results = {}
    hidden, inter = 384, 256
    with gpu_store_rounding():
        for slices, tokens, cfg in SHARED_PAIR_CASES:
            torch.manual_seed(slices * 10 + tokens)
            experts = fp8_experts(hidden, inter)
            shapes = ((slices * inter, hidden), (slices * inter, hidden), (hidden, slices * inter))
            shared = [quantize_blocks(varied(*shape) / shape[1] ** 0.5) for shape in shapes]  # blocks' scales apart
            x = torch.randn(tokens, hidden).to(torch.bfloat16)
            indices = torch.stack([torch.randperm(16)[:4] for _ in range(tokens)])
            weights = torch.rand(tokens, 4).softmax(dim=-1)
            gate_up, gate_up_scale, down, down_scale = experts._fp8_tensors()
            scales = dict(gate_up_scale=gate_up_scale, down_scale=down_scale)
            weights_q, scales_q = tuple(q for q, _ in shared), tuple(sc for _, sc in shared)
            got = _moe_gemv_triton.launch(x, indices, weights, gate_up, down, cfg, per_pair=True, shared=weights_q,
                                          shared_scales=scales_q, **scales)  # fmt: skip
            full = [t.double() for t in dequantize_experts(gate_up, gate_up_scale, down, down_scale)]
            shared_full = [dequantize_blocks(q, sc).double() for q, sc in shared]
            want = moe_gemv.reference_with_shared(x.double(), indices, weights.double(), *full, *shared_full,
                                                  act_dtype=torch.bfloat16)  # fmt: skip
            flat = [t for pair in shared for t in pair]
            op = moe_gemv.routed_and_shared_experts_gemv_fp8(x, indices, weights, *experts._fp8_tensors(), *flat)
            error = relative_error(got.sum(dim=1), want.sum(dim=1))
            if cfg is None:
                error = max(error, relative_error(got, want))
            drift = relative_error(got.sum(dim=1), op.sum(dim=1))
            name = f"fp8, {slices} slices, {tokens} tokens, config {cfg}"
            print(f"  shared pairs {name}: error {error:.2e}, vs the op's torch path {drift:.2e}")
            shape_ok = got.shape == (tokens, (4 + slices) * split_slots(inter, cfg), hidden)
            results[name] = error < 1e-2 and drift < 1e-2 and shape_ok
    return results


# ---- a MoE layer's two matrix-vector kernels in one launch (`_moe_gemv_triton._experts_kernel`) -------------------
# A separate section: `fused_experts_kernel()`, which the main block runs, prints, saves ("fused_experts") and counts
# in the exit status: the fused launch bit for bit the two launches' result (bf16 and FP8 weights, with and without a
# shared MLP folded in, the down kernel split or not), its counters back at zero after it. One persistent program:
# the interpreter runs a grid's programs one after another, so a down block of program 0 waiting on program 1's
# gate/up blocks would never see them; one program takes every gate/up block before any down block.

FUSED_EXPERTS_CONFIGS = [
    None,
    ((16, 128, 4, 1, 2), (32, 64, 4, 1, None)),
    ((32, 256, 4, 1, None), (16, 128, 4, 3, None)),
]


def fused_experts_kernel() -> dict[str, bool]:
    from hf_deepseek.kernels.counters import counters

    results = {}
    hidden, inter, tokens = 384, 256, 2
    experts = fp8_experts(hidden, inter)
    fp8 = experts._fp8_tensors()
    gate_up, down = (w.to(torch.bfloat16) for w in experts.dequantized_weights())
    shared_fp8 = [
        quantize_blocks(varied(*shape) / shape[1] ** 0.5) for shape in ((inter, hidden),) * 2 + ((hidden, inter),)
    ]
    shared_bf16 = tuple(dequantize_blocks(q, sc).to(torch.bfloat16) for q, sc in shared_fp8)
    torch.manual_seed(11)
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    indices = torch.stack([torch.randperm(16)[:4] for _ in range(tokens)])
    weights = torch.rand(tokens, 4).softmax(dim=-1)
    with gpu_store_rounding():
        for cfg in FUSED_EXPERTS_CONFIGS:
            configs = dict(config=cfg[0], down_config=cfg[1]) if cfg else {}
            for kind in ("bf16", "fp8"):
                for folded in (False, True):
                    if kind == "bf16":
                        args, extra = (x, indices, weights, gate_up, down), {}
                        shared = dict(shared=shared_bf16) if folded else {}
                    else:
                        args = (x, indices, weights, fp8[0], fp8[2])
                        extra = dict(gate_up_scale=fp8[1], down_scale=fp8[3])
                        shared = {}
                        if folded:
                            shared = dict(shared=tuple(q for q, _ in shared_fp8),
                                          shared_scales=tuple(sc for _, sc in shared_fp8))  # fmt: skip
                    apart = _moe_gemv_triton.launch(*args, **configs, **extra, **shared, per_pair=True)
                    fused = _moe_gemv_triton.launch(*args, **configs, **extra, **shared, per_pair=True, fused=True,
                                                    programs=1)  # fmt: skip
                    zeroed = not counters("moe_experts", 2 * _moe_gemv_triton.FUSED_MAX_PAIRS, x.device).any()
                    name = f"{kind}{', shared folded' if folded else ''}, configs {cfg}"
                    same = torch.equal(fused, apart)
                    print(f"  fused experts {name}: {'bit-equal' if same else 'DIFFERENT'} to the two launches, "
                          f"counters {'zero' if zeroed else 'NOT ZERO'} after")  # fmt: skip
                    results[name] = same and zeroed and bool(apart.abs().sum() > 0)
    return results


# ---- AdamW's update (`kernels/_adamw_triton.py`, `kernels.adamw.TritonAdamW`'s CUDA step) ---------------------------
# A separate section: `adamw_kernel()`, which the main block runs, prints, saves ("adamw") and counts in the exit
# status: fp32 tensors as `adamw.torch_update` computes them (up to float32 rounding), bf16 ones with the GPU's
# rounding within one bf16 rounding of it (elements past a multiple of the block masked).

ADAMW_CASES = [(torch.float32, 5000), (torch.bfloat16, 9000), (torch.float16, 17)]


def adamw_kernel() -> dict[str, bool]:
    """The kernel against the module's torch-op update on the CPU, three steps of moments and parameters."""
    from hf_deepseek.kernels import _adamw_triton
    from hf_deepseek.kernels.adamw import torch_update

    results = {}
    with gpu_store_rounding():
        for dtype, n in ADAMW_CASES:
            torch.manual_seed(n)
            ours = [torch.randn(n).to(dtype), None, torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)]
            want = [t.clone() if t is not None else None for t in ours]
            for step in (1, 2, 3):
                ours[1] = want[1] = torch.randn(n).to(dtype)
                args = (1e-3, 0.9, 0.95, 1e-8, 1e-2 / (1 - 0.9**step), (1 - 0.95**step) ** 0.5)
                _adamw_triton.adamw_update(*ours, *args)
                torch_update(*want, *args)
            tolerance = 1e-6 if dtype == torch.float32 else 2**-7
            errors = [relative_error(got, ref) for got, ref in zip(ours, want, strict=True)]
            name = f"{str(dtype)[6:]}, {n} elements"
            print(f"  adamw {name}: parameter {errors[0]:.2e}, moments {errors[2]:.2e} {errors[3]:.2e}")
            results[name] = max(errors) < tolerance and not torch.equal(ours[0], ours[0].new_zeros(n))
        # the capturable step's kernel: bias corrections from the step count in memory, beta2 = 0.999 (the float32
        # cancellation its series avoids), against the host's float64 ones
        torch.manual_seed(1)
        ours = [torch.randn(5000), None, torch.zeros(5000), torch.zeros(5000)]
        want = [t.clone() if t is not None else None for t in ours]
        for step in (1, 2, 3, 300):
            ours[1] = want[1] = torch.randn(5000)
            _adamw_triton.adamw_update_device_step(*ours, torch.tensor([float(step)]), 1e-2, 1e-3, 0.9, 0.999, 1e-8)
            torch_update(*want, 1e-3, 0.9, 0.999, 1e-8, 1e-2 / (1 - 0.9**step), (1 - 0.999**step) ** 0.5)
        errors = [relative_error(got, ref) for got, ref in zip(ours, want, strict=True)]
        print(f"  adamw device step: parameter {errors[0]:.2e}, moments {errors[2]:.2e} {errors[3]:.2e}")
        results["float32, device step count"] = max(errors) < 1e-6
    return results


# ---- the training loss's chunk kernel (`kernels/_cross_entropy_triton.py`, `output_loss.cross_entropy_rows_in_place`)
# A separate section: `cross_entropy_kernel()`, which the main block runs, prints, saves ("cross_entropy") and counts
# in the exit status: the loss sum within 1e-6 of `_chunk_terms`'s and float64's, the gradient written over the
# logits within half a unit in the last place (stored with the GPU's rounding) of float64 plus 2^-18 of fp32 error,
# ignored rows zero; one block a row with a masked tail, and several.

CROSS_ENTROPY_CASES = [(torch.bfloat16, 1000, 16384), (torch.bfloat16, 5000, 1024), (torch.float32, 5000, 1024),
                       (torch.float32, 3000, 16384)]  # fmt: skip


def cross_entropy_kernel() -> dict[str, bool]:
    """The kernel against the chunk's torch terms and float64, rows with the target at either end, ignored rows,
    a row shifted by 40 (a large max), scale 0.37."""
    from hf_deepseek.kernels._cross_entropy_triton import cross_entropy_rows_in_place
    from hf_deepseek.modeling.output_loss import _chunk_terms

    results = {}
    with gpu_store_rounding():
        for dtype, vocab, block in CROSS_ENTROPY_CASES:
            torch.manual_seed(vocab)
            logits = torch.randn(9, vocab) * 3
            logits[4] += 40
            logits = logits.to(dtype)
            targets = torch.randint(0, vocab, (9,))
            targets[1], targets[2], targets[3], targets[7] = -100, 0, vocab - 1, -100
            x, valid = logits.double(), targets != -100
            onehot = F.one_hot(targets.clamp(min=0), vocab).double() * valid[:, None]
            want_loss = ((x.logsumexp(dim=-1) - (x * onehot).sum(dim=-1)) * valid).sum().item()
            want_grad = (x.softmax(dim=-1) - onehot) * (valid[:, None] * 0.37)
            torch_loss = _chunk_terms(logits, targets, torch.tensor(0.37))[0].item()
            grad = logits.clone()
            loss = cross_entropy_rows_in_place(grad, targets, torch.tensor(0.37), block=block).item()
            tolerance = (torch.finfo(dtype).eps / 2 + 2**-18) * want_grad.abs() + 2**-18 * 0.37
            excess = ((grad.double() - want_grad).abs() - tolerance).max().item()
            errors = abs(loss - want_loss) / want_loss, abs(loss - torch_loss) / torch_loss
            name = f"{str(dtype)[6:]}, 9 x {vocab}, blocks of {block}"
            print(f"  cross_entropy {name}: loss {errors[0]:.1e} from float64, {errors[1]:.1e} from torch; "
                  f"gradient {'within' if excess <= 0 else 'PAST'} rounding of float64")  # fmt: skip
            results[name] = max(errors) < 1e-6 and excess <= 0 and not grad[~valid].any()
    return results


def _close_bf16(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within one bf16 rounding step of each other (exp and sigmoid differ in their last float32 bits)."""
    return bool(((got.float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-30).all())


def fused_moe_kernels() -> dict[str, bool]:
    """The routed experts' SwiGLU, its gradient and the combine's gradient (`modeling/fp8_moe_triton.py`) against
    `fp8_moe`'s torch references: the bf16 results within a rounding step (the combine's exactly), each FP8 operand
    bit for bit the rowwise quantisation of the bf16 result written beside it, odd widths with padded columns too."""
    from hf_deepseek.modeling import fp8_moe
    from hf_deepseek.modeling import fp8_moe_triton as kernels

    def quantised_as_reference(v, q, scale, pow2):
        rows, cols = v.shape
        want = quantize_rowwise(F.pad(v, (0, _ceil_to(cols, 16) - cols, 0, _ceil_to(rows, 16) - rows)), pow2, False)
        return _same((q, scale), want)

    results = {}
    with gpu_store_rounding():
        for pow2 in (False, True):
            for rows, inter in ((37, 24), (20, 9), (33, 40)):
                torch.manual_seed(rows)
                gate_up = (torch.randn(rows, 2 * inter) * torch.logspace(-2, 2, rows)[:, None]).bfloat16()
                h, q, scale = kernels.swiglu_rows_triton(gate_up, pow2)
                results[f"swiglu {rows}x{inter} pow2={pow2}"] = _close_bf16(
                    h, fp8_moe.swiglu_reference(gate_up)
                ) and quantised_as_reference(h, q, scale, pow2)
                d_h = torch.randn(rows, inter).bfloat16()
                d_gate_up, q, scale = kernels.swiglu_backward_rows_triton(d_h, gate_up, pow2)
                results[f"swiglu backward {rows}x{inter} pow2={pow2}"] = _close_bf16(
                    d_gate_up, fp8_moe.swiglu_backward_reference(d_h, gate_up)
                ) and quantised_as_reference(d_gate_up, q, scale, pow2)
            tokens, hidden, laid_out = 19, 40, 64
            token_pad = torch.randint(0, tokens + 1, (laid_out,))  # `tokens`: a padding row
            row_weight = torch.rand(laid_out) * (token_pad < tokens)
            d_out, y = torch.randn(tokens, hidden).bfloat16(), torch.randn(laid_out, hidden).bfloat16()
            y[token_pad == tokens] = float("nan")  # what a padding row of the grouped GEMM's output may hold
            d_y, q, scale, d_w = kernels.combine_backward_rows_triton(d_out, token_pad, row_weight, y, pow2)
            want_d_y, want_d_w = fp8_moe.combine_backward_reference(d_out, token_pad, row_weight, y)
            results[f"combine backward pow2={pow2}"] = (
                torch.equal(d_y, want_d_y)
                and quantised_as_reference(d_y, q, scale, pow2)
                and bool(torch.isfinite(d_w).all())
                and _close_bf16(d_w, want_d_w)  # sums in another order, then rounded to bf16
            )
    for name, ok in results.items():
        print(f"  fused MoE {name}: {'as the reference' if ok else 'DIFFERENT'}")
    return results


def adamw_fp8_kernel() -> dict[str, bool]:
    """AdamW's update writing the FP8 copy of the new weight (`modeling/fp8_adamw_triton.py`) against the plain
    kernel's update followed by the Hopper rowwise quantiser (with the columns' amaxes for batched weights): weight,
    moments and copy bit for bit, over two steps."""
    from hf_deepseek.kernels import _adamw_triton
    from hf_deepseek.modeling.fp8_adamw_triton import adamw_update_fp8, fusable
    from hf_deepseek.modeling.fp8_numerics import column_amax
    from hf_deepseek.modeling.fp8_triton import quantize_rowwise_amax_triton
    from hf_deepseek.modeling.fp8_weight_cache import FP8WeightCopy

    results = {}
    with gpu_store_rounding():
        for shape in ((3, 40, 24), (37, 20), (2, 9, 33)):
            for pow2 in (False, True):
                torch.manual_seed(len(shape))
                rows, cols = shape[-2:]
                cols_out = _ceil_to(cols, 16)
                p = (torch.randn(shape) * 3).bfloat16()
                m, v = torch.zeros_like(p), torch.zeros_like(p)
                want = [p.clone(), m.clone(), v.clone()]
                q, scale, amax = quantize_rowwise_amax_triton(p, rows, cols_out, pow2)
                copy = FP8WeightCopy(q, scale, amax_t=amax, pow2=pow2)
                for step in (1, 2):
                    g = torch.randn(shape).bfloat16()
                    hyper = (1e-3, 0.9, 0.95, 1e-8, 0.05 / (1 - 0.9**step), (1 - 0.95**step) ** 0.5)
                    ok = fusable(p, g, m, v, copy)
                    adamw_update_fp8(p, g, m, v, *hyper, copy)
                    _adamw_triton.adamw_update(want[0], g, want[1], want[2], *hyper)
                q, scale, _ = quantize_rowwise_amax_triton(want[0], rows, cols_out, pow2)
                amax_ok = amax is None or torch.equal(copy.amax_t, F.pad(column_amax(want[0]), (0, cols_out - cols)))
                results[f"{tuple(shape)} pow2={pow2}"] = (
                    ok
                    and all(torch.equal(a, b) for a, b in zip((p, m, v), want, strict=True))
                    and _same((copy.q, copy.scale), (q, scale))
                    and amax_ok
                )
    for name, ok in results.items():
        print(f"  adamw writing the FP8 copy {name}: {'as the update then the quantiser' if ok else 'DIFFERENT'}")
    return results


def adamw_fp8_blocks_kernel() -> dict[str, bool]:
    """The blockwise copy's update (`fp8_adamw_triton._adamw_fp8_blocks_kernel`) against the plain kernel's update
    followed by the Hopper block quantiser of the new W and of W^T: weight, moments, W's blocks, their scales and
    W^T's values bit for bit, over two steps (partial blocks and padding included)."""
    from hf_deepseek.kernels import _adamw_triton
    from hf_deepseek.modeling.fp8_adamw_triton import adamw_update_fp8, fusable
    from hf_deepseek.modeling.fp8_numerics import FP8Recipe
    from hf_deepseek.modeling.fp8_triton import HopperBackend
    from hf_deepseek.modeling.fp8_weight_cache import FP8WeightCopy

    results = {}
    with gpu_store_rounding():
        for shape in ((2, 200, 140), (130, 260), (40, 72)):
            for pow2 in (False, True):
                backend = HopperBackend(FP8Recipe(gemm="triton", pow2_scales=pow2), torch.device("cpu"))
                torch.manual_seed(len(shape))
                p = (torch.randn(shape) * 3).bfloat16()
                m, v = torch.zeros_like(p), torch.zeros_like(p)
                want = [p.clone(), m.clone(), v.clone()]
                copy = FP8WeightCopy()
                copy.fill(backend, p)
                ok = True
                for step in (1, 2):
                    g = torch.randn(shape).bfloat16()
                    hyper = (1e-3, 0.9, 0.95, 1e-8, 0.05 / (1 - 0.9**step), (1 - 0.95**step) ** 0.5)
                    ok = ok and fusable(p, g, m, v, copy)
                    adamw_update_fp8(p, g, m, v, *hyper, copy)
                    _adamw_triton.adamw_update(want[0], g, want[1], want[2], *hyper)
                q, scale = backend.quantize_weight(want[0])
                q_t = backend.quantize_weight_t(want[0], q, scale)[0]
                results[f"{tuple(shape)} pow2={pow2}"] = (
                    ok
                    and all(torch.equal(a, b) for a, b in zip((p, m, v), want, strict=True))
                    and _same((copy.q, copy.scale), (q, scale))
                    and torch.equal(copy.q_t.view(torch.uint8), q_t.view(torch.uint8))
                )
    for name, ok in results.items():
        verdict = "as the update then the quantiser" if ok else "DIFFERENT"
        print(f"  adamw writing the blockwise FP8 copy {name}: {verdict}")
    return results


def blockwise_fused_mlp() -> dict[str, bool]:
    """The Hopper backend's blockwise experts (`fp8_moe.FP8RoutedMLPFunction` with 1x128 tiles, Triton quantisers and
    GEMMs) against its layer-by-layer path, in bf16: the output and the four gradients bit for bit."""
    import copy
    import dataclasses

    from hf_deepseek.modeling.fp8 import convert_to_fp8_training
    from hf_deepseek.modeling.fp8_numerics import FP8Recipe
    from hf_deepseek.modeling.fp8_triton import HopperBackend

    config = DeepSeekConfig(hidden_size=64, moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                            n_group=1, topk_group=1)  # fmt: skip
    torch.manual_seed(9)
    experts = RoutedExperts(config).to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x, d_out = torch.randn(300, 64).bfloat16(), torch.randn(300, 64).bfloat16()
    indices, weights = torch.stack([torch.randperm(3)[:2] for _ in range(300)]), torch.rand(300, 2)  # expert 3 idle

    def run(recipe):
        module = convert_to_fp8_training(copy.deepcopy(experts), recipe)
        module.fp8_backend = HopperBackend(recipe, torch.device("cpu"))
        module.fp8_backend.device_type = "cpu"  # the interpreter's device
        x_, weights_ = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = module(x_, indices, weights_)
        return (out, *torch.autograd.grad(out, [x_, weights_, module.gate_up_proj, module.down_proj], d_out))

    layer_by_layer = FP8Recipe.named("deepseek", gemm="triton")
    fused = run(dataclasses.replace(layer_by_layer, fused_moe_quantization=True))
    names = ("output", "d tokens", "d routing weights", "d gate_up", "d down")
    results = {name: torch.equal(a, b) for name, a, b in zip(names, fused, run(layer_by_layer), strict=True)}
    for name, ok in results.items():
        print(f"  blockwise whole experts' MLP, {name}: {'as layer by layer' if ok else 'DIFFERENT'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    quantiser, kernels = rowwise_quantiser() | segment_columns_quantiser(), weight_only_kernels()
    router = moe_router()  # the fused MoE router's section
    variants = moe_gemv_variants()  # the matrix-vector kernels' split-K / pipelined variants' section
    grouped = moe_grouped_gemv_kernels()  # the expert-grouped kernels' section
    rows = linear_rows_kernel()  # the linear layers' decode rows section
    heads = head_matmul_kernel()  # decode attention's absorbed products section
    front = mla_front_kernel()  # a decode step's MLA front section
    chain = mla_chain_kernel()  # a batch-1 step's MLA input chain section
    pair = linear_pair_kernel()  # two linear layers of one input section
    norm = norm_linear_kernel()  # an RMSNorm in the linear layer's launch section
    shared_pairs = shared_pairs_kernels()  # the shared MLP in the routed experts' launches section
    shared_pairs |= fp8_shared_pairs_kernels()  # and with FP8 weights
    adamw = adamw_kernel()  # AdamW's update section
    cross_entropy = cross_entropy_kernel()  # the training loss's chunk kernel section
    fused_experts = fused_experts_kernel()  # a MoE layer's two kernels in one launch section
    fused_moe = fused_moe_kernels()  # the routed experts' SwiGLU and combine writing FP8 rows section
    adamw_fp8 = adamw_fp8_kernel()  # AdamW's update writing the weight's FP8 copy section
    adamw_fp8 |= {f"blockwise {k}": ok for k, ok in adamw_fp8_blocks_kernel().items()}  # and the blockwise copy
    fused_moe |= {f"blockwise {k}": ok for k, ok in blockwise_fused_mlp().items()}  # the blockwise experts' MLP
    print(f"rowwise quantiser: {sum(quantiser.values())}/{len(quantiser)} cases bit-identical")
    for name, same in quantiser.items():
        if not same:
            print(f"  DIFFERENT: {name}")
    for name, error in kernels.items():
        print(f"{name}: relative error {error:.2e}")
    print(f"MoE router kernel: {sum(router.values())}/{len(router)} cases as the torch routing")
    print("".join(f"  DIFFERENT: {name}\n" for name, same in router.items() if not same), end="")
    if args.json:
        with open(args.json, "w") as out:
            record = {"command": "TRITON_INTERPRET=1 python " + " ".join(sys.argv), "torch": torch.__version__,
                      "rowwise_quantiser_bit_identical": quantiser, "relative_errors": kernels}  # fmt: skip
            record["moe_router_as_torch"] = router
            record["moe_gemv_variants"] = variants
            record["moe_grouped_gemv"] = grouped
            record["linear_rows"] = rows
            record["head_matmul"] = heads
            record["mla_front"] = front
            record["mla_chain"] = chain
            record["linear_pair"] = pair
            record["norm_linear"] = norm
            record["shared_pairs"] = shared_pairs
            record["adamw"] = adamw
            record["cross_entropy"] = cross_entropy
            record["fused_experts"] = fused_experts
            record["fused_moe_quantisation"] = fused_moe
            record["adamw_fp8_copy"] = adamw_fp8
            json.dump(record, out, indent=1)
    print(f"moe_gemv variants: {sum(variants.values())}/{len(variants)} within tolerance")
    print(f"moe_grouped_gemv kernels: {sum(grouped.values())}/{len(grouped)} within tolerance")
    print(f"linear_rows kernel: {sum(rows.values())}/{len(rows)} within tolerance")
    print(f"head_matmul kernel: {sum(heads.values())}/{len(heads)} within tolerance")
    print(f"mla_front kernel: {sum(front.values())}/{len(front)} within tolerance")
    print(f"mla_chain kernel: {sum(chain.values())}/{len(chain)} as the kernels apart")
    print(f"linear_pair kernel: {sum(pair.values())}/{len(pair)} within tolerance")
    print(f"norm_linear kernel: {sum(norm.values())}/{len(norm)} within tolerance")
    print(f"shared pairs kernels: {sum(shared_pairs.values())}/{len(shared_pairs)} within tolerance")
    print(f"adamw kernel: {sum(adamw.values())}/{len(adamw)} within tolerance")
    print(f"cross_entropy kernel: {sum(cross_entropy.values())}/{len(cross_entropy)} within tolerance")
    print(f"fused MoE quantisation kernels: {sum(fused_moe.values())}/{len(fused_moe)} as the references")
    print(f"adamw writing the FP8 copy: {sum(adamw_fp8.values())}/{len(adamw_fp8)} as the update then the quantiser")
    print(f"fused experts kernel: {sum(fused_experts.values())}/{len(fused_experts)} as the two launches")
    kernels_ok = all(error < 1e-2 for error in kernels.values())  # bf16 / FP8 rounding; the exact checks 0 or 1
    sys.exit(
        0
        if all(quantiser.values())
        and all(router.values())
        and all(variants.values())
        and all(grouped.values())
        and all(rows.values())
        and all(heads.values())
        and all(front.values())
        and all(chain.values())
        and all(pair.values())
        and all(norm.values())
        and all(shared_pairs.values())
        and all(adamw.values())
        and all(cross_entropy.values())
        and all(fused_experts.values())
        and all(fused_moe.values())
        and all(adamw_fp8.values())
        and kernels_ok
        else 1
    )
