"""Census of the FP8 quantisations in one training step of the bench (`hf-deepseek bench train`, rowwise recipe with
the Triton quantisers, `hf_deepseek-fp8-rowwise-triton-quant`): every call of the backend's quantisers in one
forward, backward and optimizer step, with its operand, orientation, pass and module, scaled to the bench's step.

    python benchmarks/fp8_quant_census.py [--json census.json]              # CPU, well under a minute
    python benchmarks/fp8_quant_census.py --time --sweep --json census.json  # + each kernel timed on the GPU

The step runs on a model with the bench's widths (hidden 2048, MLA ranks 1536/512, dense MLP 10944, 64 routed experts
of width 1408, 2 shared, top-6) but few layers (the first, dense, and one MoE layer) and few tokens, and a small
vocabulary (the output head and embeddings are not FP8 and quantise nothing), so that it fits a CPU; it runs the
emulated backend, whose quantiser calls are the Hopper backend's (same functions, same operands), with the GEMMs
replaced by zeros of their shape and the quantisers' outputs by placeholders of theirs (`--exact` computes both:
minutes on a CPU). Each call is then scaled to the bench: token dimensions to
batch x sequence (16,384), routed-row buffers to the bench's 128-aligned layout (ceil128(16384 x 6) + 128 x 64 =
106,496 rows), the dense layer's calls once and the MoE layer's seven times. For each call at that shape the script
gives the Triton kernel plan the Hopper backend runs (`fp8_numerics.rowwise_plan` and neighbours) now ("after": the
experts' weights quantised with their transposes' amaxes, "rows_amax" then "cols_amax", everything else with its own
amax pass) and in the step the profile of 2026-12-04 measured ("before": each transposed operand with its own amax
pass, 2048-wide rows 4 a program), its launches, the bytes of a single pass (bf16 read once, FP8 and scales written
once: the convention of `fp8_bench.py --quantisers-only`), the bytes with each extra read of the input, and an
estimated time at the GB/s the H200 sweeps of 2026-12-04 and 2026-12-04e measured for that operand kind and plan
(`RATES`; "~" where the shape or plan was not in the sweep and the nearest measured kind stands in). `--time` (CUDA)
adds `triton.testing.do_bench` medians of each kernel at its bench shape, before and after; `--sweep` times plans of
the pair ("rows_amax", "cols_amax") at the bench's largest operands against the separate passes.

The profile of that variant's step on the H200 (2026-12-04, `docs/PERF.md`) lists, per step, 234 launches of
`_rowwise_rows_kernel` (17.09 ms) and 390 of `_rowwise_cols_kernel` (14.13 ms): 31.2 ms in 624 launches. (PERF.md's
"43.0 ms in 692 launches" adds the operator table's `_rowwise_*_kernel_<n>` rows, which are the CPU-side launch
records of some of those same kernels, their CUDA time a subset.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from hf_deepseek import DeepSeekConfig
from hf_deepseek.evals.bench_train import FULL_TRAIN_PLAN, OURS_FP8_ROWWISE_TRITON_QUANT, build_model
from hf_deepseek.modeling import fp8 as fp8_module
from hf_deepseek.modeling import fp8_numerics
from hf_deepseek.modeling.fp8_numerics import (
    BLOCK,
    FP8,
    _ceil_to,
    _pow2_at_least,
    rowwise_amax_plan,
    rowwise_from_amax_plan,
    rowwise_plan,
)

BENCH_TOKENS = FULL_TRAIN_PLAN.batch_size * FULL_TRAIN_PLAN.seq_len  # 16384
# one step of hf_deepseek-fp8-rowwise-triton-quant, H200, 2026-12-04d
# (docs/train-h200/profile_fp8_triton_quant_2026-12-04d.txt)
PROFILE = {
    "rows": {"launches": 234, "ms": 17.09, "kernel": "_rowwise_rows_kernel"},
    "cols": {"launches": 390, "ms": 14.13, "kernel": "_rowwise_cols_kernel"},
}
COPY_CEILING_GBS = 4156  # device-to-device copy, read + written, same sweep
# GB/s (bf16 read once + FP8 written once) that the H200 sweep of 2026-12-04 measured, by operand and plan
# (`fp8_bench.py --quantisers-only`, docs/PERF.md): (operand class, plan kind, block_r, block_c, warps) -> GB/s
RATES = {
    ("activations", "rows", 4, 2048, 8): 2711,
    ("activations", "rows", 1, 2048, 4): 3132,
    ("activations^T", "cols_split", 64, 128, 8): 1915,
    ("routed rows^T", "cols_split", 64, 128, 8): 2000,
    ("gate_up weights", "rows", 4, 2048, 8): 3372,
    ("gate_up weights", "rows", 1, 2048, 4): 3847,
    ("gate_up weights^T", "cols", 16, 512, 8): 2054,
    ("gate_up weights^T", "cols_split", 64, 128, 8): 2472,
    ("down weights", "rows", 4, 2048, 8): 2429,
    ("down weights", "rows", 1, 2048, 4): 2923,
    ("down weights^T", "cols", 16, 512, 8): 2152,
    ("down weights^T", "cols_split", 64, 128, 8): 2338,
    # the pair, by the census's own convention (its bytes include the column amaxes), sweep of 2026-12-04e
    ("gate_up weights", "rows_amax", 1, 2048, 4): 2996,
    ("down weights", "rows_amax", 1, 2048, 4): 2710,
    ("gate_up weights^T", "cols_amax", 64, 128, 8): 4043,  # chunks of 512 columns
    ("down weights^T", "cols_amax", 64, 128, 8): 3834,
}
# where the pair was not timed: "rows_amax" at the rate of the "rows" kernel it extends, "cols_amax" at the rate of
# the transposed kernel it comes from with its amax pass removed (that pass reads 2 of the 5 bytes a value the two
# passes move, so 5/3 of its GB/s)
AMAX_PASS_SHARE = 2 / 5


@dataclass
class Call:
    """One quantisation call of the small step."""

    func: str  # backend method
    role: str  # operand kind
    phase: str  # forward, backward, optimizer
    module: str
    layer: int
    shape: tuple[int, ...]
    transposed: bool  # the reduced (last) dimension is not the contiguous one
    dtype: str
    amax_in: bool = False  # quantised from amaxes taken by an earlier pass
    amax_out: bool = False  # this pass also takes its transpose's amaxes
    key: tuple = ()  # (storage pointer, offset, shape, strides, version) of the operand
    base_key: tuple = ()  # the same for the untransposed tensor (to pair orientations)
    bench_ms: float = 0.0  # est. ms a bench step (set by scale_calls)
    bench_plan: str = ""  # the kind of its kernel plan at the bench shape (set by scale_calls)


@dataclass
class Row:
    """One call scaled to the bench step."""

    role: str
    module_kind: str
    phase: str
    shape: tuple[int, ...]
    plan: tuple
    launches: int
    reads: float  # times the kernel(s) read the input (L2 second passes counted as reads)
    calls: int  # per bench step
    gbytes: float  # per call: input once, FP8 once, scales
    gbs: float | None = None
    rate_source: str = ""
    est_ms: float | None = None  # per call
    measured_ms: float | None = None  # per call (--time)
    modules: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------------
# Recording


class Recorder:
    def __init__(self, weight_names: dict[int, str]):
        self.calls: list[Call] = []
        self.alive: list = []  # every quantised operand's storage, kept so that no address is reused within the step
        self.gemms: list[tuple[str, str, str, tuple]] = []
        self.phase, self.module, self.kind, self.x_ptr = "forward", "?", "?", None
        self.weight_names, self.depth = weight_names, 0

    @contextlib.contextmanager
    def context(self, phase: str, weight: torch.Tensor | None = None, kind: str = "", x_ptr=None):
        saved = (self.phase, self.module, self.kind, self.x_ptr)
        self.phase = phase
        if weight is not None:
            self.module = self.weight_names.get(weight.data_ptr(), "?")
        self.kind, self.x_ptr = kind or self.kind, x_ptr
        try:
            yield
        finally:
            self.phase, self.module, self.kind, self.x_ptr = saved

    def role(self, func: str, x: torch.Tensor) -> str:
        grouped = self.kind == "grouped"
        if func.startswith("quantize_weight"):
            name = "expert weights" if grouped else "weight"
            return name + ("^T" if func == "quantize_weight_t" else "")
        transposed = x.dim() == 2 and x.stride(-1) != 1 and x.shape[-1] > 1
        if self.phase == "forward":
            return "routed rows" if grouped else "x"
        if not transposed:
            return "routed grad rows" if grouped else "dy"
        is_x = x.untyped_storage().data_ptr() == self.x_ptr
        return ("routed rows^T" if is_x else "routed grad^T") if grouped else ("x^T" if is_x else "dy^T")

    def record(self, func: str, x: torch.Tensor, amax_in: bool, amax_out: bool) -> None:
        if self.depth > 1:
            return  # a backend method calling another: recorded once, as the outer one
        layer = int(self.module.split("layers.")[1].split(".")[0]) if "layers." in self.module else -1
        view = x.transpose(-1, -2) if func == "quantize_weight_t" else x  # the operand as quantised
        self.alive.append(x.untyped_storage())
        self.calls.append(
            Call(
                func, self.role(func, x), self.phase, self.module, layer, tuple(view.shape),
                view.stride(-1) != 1 and view.shape[-1] > 1, str(x.dtype).removeprefix("torch."), amax_in, amax_out,
                key=_key(view), base_key=_key(view.transpose(-1, -2)),
            )
        )  # fmt: skip


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)


def placeholder(backend, name: str, x: torch.Tensor, args, kwargs):
    """What the emulated backend's quantiser returns, in shape and dtype only (uninitialised values): the census
    counts calls, and the emulated quantisation of 64 experts of the bench's width takes tens of seconds."""
    rowwise, f32 = backend.rowwise, torch.float32
    if name == "quantize_rows":
        rows_multiple = args[0] if args else kwargs.get("rows_multiple", 1)
        rows, cols = _ceil_to(x.shape[0], rows_multiple), _ceil_to(x.shape[1], BLOCK)
        return x.new_empty(rows, cols, dtype=FP8), x.new_empty(rows, 1 if rowwise else cols // BLOCK, dtype=f32)
    n, k = x.shape[-2:]
    grid = (n, 1) if rowwise else (_ceil_to(n, BLOCK) // BLOCK, _ceil_to(k, BLOCK) // BLOCK)
    if name == "quantize_weight_t":
        return x.new_empty(*x.shape[:-2], k, n, dtype=FP8), x.new_empty(*x.shape[:-2], *grid[::-1], dtype=f32)
    out = (x.new_empty(x.shape, dtype=FP8), x.new_empty(*x.shape[:-2], *grid, dtype=f32))
    return (*out, x.new_empty(*x.shape[:-2], k, dtype=f32) if rowwise else None) if name.endswith("amax_t") else out


def instrument(backend, rec: Recorder, exact: bool) -> None:
    """Wrap the backend's quantisers and GEMMs (on this instance) so that each call is recorded (and, unless
    `exact`, answered with placeholders of its outputs' shapes)."""

    def wrap(name: str):
        inner = getattr(backend, name)

        def call(x, *args, **kwargs):
            rec.depth += 1
            try:
                result = inner(x, *args, **kwargs) if exact else placeholder(backend, name, x, args, kwargs)
                amax = kwargs.get("amax", args[2] if name == "quantize_weight_t" and len(args) > 2 else None)
                amax_in = amax is not None
                amax_out = name.endswith("_and_amax_t") and result[2] is not None
                rec.record(name.replace("_and_amax_t", ""), x, amax_in, amax_out)
                return result
            finally:
                rec.depth -= 1

        setattr(backend, name, call)

    for name in ("quantize_rows", "quantize_weight", "quantize_weight_and_amax_t", "quantize_weight_t"):
        if hasattr(backend, name):
            wrap(name)

    def wrap_gemm(name: str):
        inner = getattr(backend, name)

        def call(a, a_scale, b, *args, **kwargs):
            rec.gemms.append((name, rec.phase, rec.module, (tuple(a.shape), tuple(b.shape))))
            return inner(a, a_scale, b, *args, **kwargs)

        setattr(backend, name, call)

    for name in ("gemm", "grouped_gemm", "grouped_wgrad"):
        wrap_gemm(name)


def _zero_gemm(a, a_scale, b, b_scale, b_blocks, out_dtype, fast_accum=True):
    return a.new_zeros(a.shape[0], b.shape[-2], dtype=out_dtype)


def _zero_grouped_gemm(a, a_scale, b, b_scale, layout, out_dtype, fast_accum=True):
    return a.new_zeros(a.shape[0], b.shape[-2], dtype=out_dtype)


def _zero_grouped_wgrad(a, a_scale, b, b_scale, layout):
    return a.new_zeros(layout.num_experts, a.shape[0], b.shape[0], dtype=torch.float32)


@contextlib.contextmanager
def shapes_only(backends):
    """GEMMs (FP8, and the bf16 weight gradients next to them) replaced by zeros of their output's shape: what the
    census counts is which quantisations run on which operands, not what the products are, and the emulated
    products of 64 experts of the bench's width take minutes on a CPU."""
    patched = [(fp8_numerics, "grouped_wgrad_high_precision"), (fp8_module, "linear_wgrad_high_precision")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patched]
    fp8_numerics.grouped_wgrad_high_precision = lambda dy, x, layout, fbgemm=False: dy.new_zeros(
        layout.num_experts, dy.shape[1], x.shape[1], dtype=torch.promote_types(dy.dtype, x.dtype)
    )
    fp8_module.linear_wgrad_high_precision = lambda dy, x: dy.new_zeros(
        dy.shape[1], x.shape[1], dtype=torch.promote_types(dy.dtype, x.dtype)
    )
    for backend in backends:
        backend.gemm, backend.grouped_gemm, backend.grouped_wgrad = _zero_gemm, _zero_grouped_gemm, _zero_grouped_wgrad
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


@contextlib.contextmanager
def function_contexts(rec: Recorder):
    """Tell the recorder, around each FP8 autograd function's forward and backward, which pass and module runs."""
    originals = {}
    for cls, kind in ((fp8_module.FP8LinearFunction, "linear"), (fp8_module.FP8GroupedLinearFunction, "grouped")):
        fwd, bwd = cls.forward, cls.backward
        originals[cls] = (fwd, bwd)

        def forward(ctx, x, weight, *rest, _fwd=fwd, _kind=kind):
            with rec.context("forward", weight, _kind):
                return _fwd(ctx, x, weight, *rest)

        def backward(ctx, *grads, _bwd=bwd, _kind=kind):
            saved = ctx.saved_tensors
            with rec.context("backward", saved[1], _kind, saved[0].untyped_storage().data_ptr()):
                return _bwd(ctx, *grads)

        cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)
    try:
        yield
    finally:
        for cls, (fwd, bwd) in originals.items():
            cls.forward, cls.backward = staticmethod(fwd), staticmethod(bwd)


def run_small_step(args) -> tuple[Recorder, DeepSeekConfig, dict]:
    config = DeepSeekConfig(**{**FULL_TRAIN_PLAN.config, "num_hidden_layers": args.layers, "vocab_size": args.vocab})
    device, dtype = torch.device(args.device), torch.bfloat16
    start = time.perf_counter()
    model = build_model(args.variant, config, device, dtype)
    built = time.perf_counter() - start
    weight_names = {p.data_ptr(): n.removesuffix(".weight") for n, p in model.named_parameters()}
    backends = {id(m.fp8_backend): m.fp8_backend for m in model.modules() if hasattr(m, "fp8_backend")}
    rec = Recorder(weight_names)
    stubs = contextlib.nullcontext() if args.exact else shapes_only(backends.values())
    stubs.__enter__()
    for backend in backends.values():
        instrument(backend, rec, args.exact)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    with function_contexts(rec):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with rec.context("optimizer", kind="optimizer"):
            optimizer.step()
    stepped = time.perf_counter() - start
    stubs.__exit__(None, None, None)
    for backend in backends.values():  # drop the instance wrappers: the class methods show again
        for name in list(vars(backend)):
            if name.startswith(("quantize", "gemm", "grouped")):
                delattr(backend, name)
    names = [b.name for b in backends.values()]
    info = {"build_s": built, "step_s": stepped, "loss": float(loss.detach()), "backend": names}
    return rec, config, info


# ------------------------------------------------------------------------------------------------------------------
# Scaling to the bench step, plans, bytes, estimates


def layout_rows(tokens: int, config: DeepSeekConfig) -> int:
    return _ceil_to(tokens * config.num_experts_per_tok, BLOCK) + BLOCK * config.n_routed_experts


def module_kind(module: str) -> str:
    if ".experts" in module:
        return "routed experts"
    if ".shared_experts." in module:
        return "shared experts"
    if ".mlp." in module:
        return "dense MLP"
    return "attention " + module.rsplit(".", 1)[-1]


def operand_class(role: str, shape: tuple[int, ...]) -> str:
    """The sweep's operand the call is nearest to."""
    if role.startswith("expert weights"):
        kind = "gate_up" if shape[-2 if role.endswith("^T") else -1] == 2048 else "down"
        return f"{kind} weights" + ("^T" if role.endswith("^T") else "")
    if role.endswith("^T"):
        return "routed rows^T" if role.startswith("routed") else "activations^T"
    return "activations"


PREVIOUS_ROWS_PLAN = ("rows", 4, 2048, 8, 0, 0)  # what rowwise_plan gave 2048-wide rows in that profiled step


def plan_for(call: Call, shape: tuple[int, ...], before: bool) -> tuple | None:
    """(kind, block_r, block_c, warps, chunk, programs) of the Hopper backend's kernel for this call at this shape;
    `before`: as the profiled step ran it (no amaxes passed on, the previous plan for 2048-wide rows)."""
    dtype = getattr(torch, call.dtype)
    if call.transposed:  # a transposed view of a row-major tensor, as the step passes it
        view = torch.empty(shape[:-2] + shape[-2:][::-1], dtype=dtype, device="meta").transpose(-1, -2)
    else:
        view = torch.empty(shape, dtype=dtype, device="meta")
    rows, cols = shape[-2:]
    rows_out = rows if call.func.startswith("quantize_weight") else _ceil_to(rows, 16)
    cols_out = _ceil_to(cols, 16)
    plan = None
    if call.amax_out and not before:
        plan = rowwise_amax_plan(view, rows_out, cols_out)
    elif call.amax_in and call.transposed and not before:  # given amaxes only where its untransposed pass takes them
        base = view.transpose(-1, -2)
        if rowwise_amax_plan(base, base.shape[-2], _ceil_to(base.shape[-1], 16)) is not None:
            plan = rowwise_from_amax_plan(view, rows_out, cols_out)
    plan = tuple(plan or rowwise_plan(view, rows_out, cols_out))[:6]
    if before and plan[:4] == ("rows", 1, 2048, 4):
        plan = PREVIOUS_ROWS_PLAN
    return plan


LAUNCHES = {"rows": 1, "rows_loop": 1, "cols": 1, "cols_split": 2, "rows_amax": 2, "cols_amax": 1}  # rows_amax: memset
READS = {"rows": 1, "rows_loop": 2, "cols": 2, "cols_split": 2, "rows_amax": 1, "cols_amax": 1}


def rate_for(role: str, shape: tuple[int, ...], plan: tuple) -> tuple[float, str]:
    """(GB/s, source) for this call: measured in the sweep, its nearest measured kind ("~"), or the pair's estimate."""
    cls = operand_class(role, shape)
    kind, block_r, block_c, warps = plan[:4]
    key = (cls, kind, block_r, block_c, warps)
    if key in RATES:
        return RATES[key], "sweep"
    if kind == "rows_amax":  # the "rows" kernel with the column amaxes folded in: the rate rows has at that width
        gbs, source = rate_for(role, shape, ("rows", 1, 2048, 4) if block_c == 2048 else ("rows", 0, block_c, 0))
        return gbs, f"est.: as rows ({source})"
    if kind == "cols_amax":
        base = {k: v for k, v in RATES.items() if k[0] == cls and k[1] in ("cols", "cols_split")}
        worst = min(base.values()) if base else RATES[("activations^T", "cols_split", 64, 128, 8)]
        return worst / (1 - AMAX_PASS_SHARE), "est.: its cols kernel less the amax pass"
    same_kind = [v for k, v in RATES.items() if k[0] == cls and k[1] == kind]
    if same_kind:
        return min(same_kind), "~ same operand, other plan"
    fallback = RATES[("activations^T", "cols_split", 64, 128, 8)] if kind.startswith("cols") else RATES[
        ("activations", "rows", 4, 2048, 8)]  # fmt: skip
    return fallback, "~ activations"


def scale_calls(calls: list[Call], config: DeepSeekConfig, small_tokens: int, before: bool) -> list[Row]:
    """Each call at the bench's shape and count, merged by (operand, module kind, pass, shape, plan); each call's
    est. ms a step goes to `call_ms` (by index) for the redundancy figures."""
    small_rows, bench_rows = layout_rows(small_tokens, config), layout_rows(BENCH_TOKENS, config)
    dense_layers = FULL_TRAIN_PLAN.config["first_k_dense_replace"]
    moe_layers = FULL_TRAIN_PLAN.config["num_hidden_layers"] - dense_layers
    rows: dict[tuple, Row] = {}
    for call in calls:
        shape = tuple({small_tokens: BENCH_TOKENS, small_rows: bench_rows}.get(d, d) for d in call.shape)
        per_step = dense_layers if 0 <= call.layer < dense_layers else moe_layers
        plan = plan_for(call, shape, before)
        numel = math.prod(shape)
        rows_out = shape[-2] if call.func.startswith("quantize_weight") else _ceil_to(shape[-2], 16)
        batch = math.prod(shape[:-2])
        q_bytes = batch * rows_out * _ceil_to(shape[-1], 16)
        gbytes = (numel * torch.empty(0, dtype=getattr(torch, call.dtype)).element_size() + q_bytes) / 1e9
        gbytes += batch * rows_out * 4 / 1e9 + (batch * shape[-1] * 4 / 1e9 if plan[0] == "rows_amax" else 0)
        key = (call.role, module_kind(call.module), call.phase, shape, plan)
        if key not in rows:
            gbs, source = rate_for(call.role, shape, plan)
            rows[key] = Row(call.role, module_kind(call.module), call.phase, shape, plan, LAUNCHES[plan[0]],
                            READS[plan[0]], 0, gbytes, gbs, source, gbytes / gbs * 1e3)  # fmt: skip
        rows[key].calls += per_step
        rows[key].modules.append(call.module)
        call.bench_ms, call.bench_plan = rows[key].est_ms * per_step, plan[0]
    return list(rows.values())


def redundancy(calls: list[Call]) -> dict:
    """Operands quantised again in the same orientation (with their est. ms a step), and operands quantised in both
    orientations."""
    seen: dict[tuple, list[Call]] = defaultdict(list)
    for call in calls:
        seen[call.key].append(call)
    again = [c for v in seen.values() for c in v[1:]]
    keys = {c.key for c in calls}
    both = [c for c in calls if c.transposed and c.base_key in keys]
    return {
        "quantised again (same operand, same orientation)": len(again),
        "... est. ms a step": round(sum(c.bench_ms for c in again), 3),
        "examples": sorted(f"{v[0].role} of {v[0].module} again in {v[1].module}" for v in seen.values() if len(v) > 1),
        "operands quantised in both orientations": len(both),
        "... whose transpose takes its own amax pass": sum(c.bench_plan != "cols_amax" for c in both),
    }


# ------------------------------------------------------------------------------------------------------------------
# GPU timing of each row at its bench shape


def _operand(shape: tuple[int, ...], transposed: bool, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(the row-major tensor, the view the kernel quantises) of this bench shape."""
    base_shape = shape[:-2] + (shape[-2:][::-1] if transposed else shape[-2:])
    base = torch.randn(base_shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    return base, (base.transpose(-1, -2) if transposed else base)


def time_plan(shape: tuple[int, ...], transposed: bool, weight: bool, plan: tuple, gen) -> float:
    from triton.testing import do_bench

    from hf_deepseek.modeling.fp8_numerics import RowwisePlan, column_amax
    from hf_deepseek.modeling.fp8_triton import quantize_rowwise_amax_triton, quantize_rowwise_triton

    base, view = _operand(shape, transposed, gen)
    rows_out = shape[-2] if weight else _ceil_to(shape[-2], 16)
    cols_out = _ceil_to(shape[-1], 16)
    plan = RowwisePlan(*plan)
    if plan.kind == "rows_amax":
        return do_bench(lambda: quantize_rowwise_amax_triton(view, rows_out, cols_out, False, plan=plan), warmup=10,
                        rep=50, return_mode="median")  # fmt: skip
    amax = column_amax(base) if plan.kind == "cols_amax" else None
    return do_bench(lambda: quantize_rowwise_triton(view, rows_out, cols_out, False, plan=plan, amax=amax),
                    warmup=10, rep=50, return_mode="median")  # fmt: skip


def time_rows(rows: list[Row]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache: dict[tuple, float] = {}
    for row in rows:
        transposed, weight = row.role.endswith("^T"), "weight" in row.role
        key = (row.shape, row.plan, transposed, weight)
        if key not in cache:
            cache[key] = time_plan(row.shape, transposed, weight, row.plan, gen)
        row.measured_ms = cache[key]


SWEEP_OPERANDS = {  # the bench's largest operands of each kind: (shape, transposed, weight)
    "activations [16384, 2048]": ((16384, 2048), False, False),
    "gradients [16384, 10944]": ((16384, 10944), False, False),
    "gate_up weights [64, 2816, 2048]": ((64, 2816, 2048), False, True),
    "down weights [64, 2048, 1408]": ((64, 2048, 1408), False, True),
    "activations^T [2048, 16384]": ((2048, 16384), True, False),
    "gate_up weights^T [64, 2048, 2816]": ((64, 2048, 2816), True, True),
    "down weights^T [64, 1408, 2048]": ((64, 1408, 2048), True, True),
}


def sweep_pair() -> dict:
    """Plans of the pair at the bench's largest operands: rows_amax (rows a step, warps, rows a program) for
    row-contiguous ones; for transposed ones cols_amax (tile, chunk) and, against it, cols_split (its amax launch
    and the same quantising launch) at the same tiles and chunks. Each against the operand quantised alone with its
    own amax pass (`rowwise_plan`); "default" is what the backend runs: the pair where `rowwise_amax_plan` gives one
    (the experts' weights), else that own pass."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = {}
    for name, (shape, transposed, weight) in SWEEP_OPERANDS.items():
        rows_out = shape[-2] if weight else _ceil_to(shape[-2], 16)
        cols_out = _ceil_to(shape[-1], 16)
        base = torch.empty(shape[:-2] + shape[-2:][::-1] if transposed else shape, dtype=torch.bfloat16, device="meta")
        paired = rowwise_amax_plan(base, base.shape[-2], _ceil_to(base.shape[-1], 16)) is not None
        view = base.transpose(-1, -2) if transposed else base
        alone = tuple(rowwise_plan(view, rows_out, cols_out))[:6]  # this orientation with its own amax pass
        if transposed:
            tiles = ((64, 128, 8), (32, 256, 8), (16, 512, 8), (64, 256, 16))
            chunks = [c for c in (512, 1024, 2048, 4096, cols_out) if c <= cols_out]
            plans = [
                (kind, r, c, w, ch, 0) for kind in ("cols_amax", "cols_split") for r, c, w in tiles for ch in chunks
            ]
            default = tuple(rowwise_from_amax_plan(view, rows_out, cols_out))[:6] if paired else alone
        else:
            block_c = _pow2_at_least(cols_out)
            plans = [("rows_amax", r, block_c, w, n, 0) for r in (1, 2, 4) for w in (4, 8, 16)
                     for n in (8, 16, 32, 64, 128, 256)
                     if r * block_c <= 16384 and 8 <= r * block_c // (32 * w) <= 64 and n >= r]  # fmt: skip
            default = tuple(rowwise_amax_plan(view, rows_out, cols_out))[:6] if paired else alone
        results = {"own amax pass " + str(alone): time_plan(shape, transposed, weight, alone, gen)}
        for plan in dict.fromkeys([default, *plans]):
            results[str(plan)] = time_plan(shape, transposed, weight, plan, gen)
        out[name] = results
        best = min((v, k) for k, v in results.items() if not k.startswith("own"))
        print(f"{name}: own amax pass {results['own amax pass ' + str(alone)]:.3f} ms; default "
              f"{'(the pair) ' if paired else '(own pass) '}{results[str(default)]:.3f} ms; best {best[0]:.3f} ms "
              f"{best[1]}", flush=True)  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------------------
# Report

ORDER = ["x", "x^T", "dy", "dy^T", "weight", "weight^T", "routed rows", "routed grad rows", "routed rows^T",
         "routed grad^T", "expert weights", "expert weights^T"]  # fmt: skip


def summarise(rows: list[Row], timed: bool) -> dict[str, dict]:
    by_role: dict[str, dict] = {}
    for row in rows:
        entry = by_role.setdefault(row.role, {"calls": 0, "launches": 0, "GB": 0.0, "GB_moved": 0.0, "est_ms": 0.0,
                                              "gpu_ms": 0.0, "plans": set()})  # fmt: skip
        entry["calls"] += row.calls
        entry["launches"] += row.calls * row.launches
        entry["GB"] += row.calls * row.gbytes
        entry["GB_moved"] += row.calls * row.gbytes * (1 + (row.reads - 1) * 2 / 3)  # an extra read: 2 of 3 bytes
        entry["est_ms"] += row.calls * row.est_ms
        entry["gpu_ms"] += row.calls * (row.measured_ms or 0.0) if timed else 0.0
        entry["plans"].add(row.plan[0])
    for entry in by_role.values():
        entry["plans"] = "+".join(sorted(entry["plans"]))
    return dict(sorted(by_role.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def kernel_families(rows: list[Row], timed: bool) -> dict[str, list]:
    out = {"rows": [0, 0.0], "cols": [0, 0.0]}
    for row in rows:
        family = "rows" if row.plan[0].startswith("rows") else "cols"
        out[family][0] += row.calls * (row.launches - (row.plan[0] == "rows_amax"))  # the memset is not this kernel
        out[family][1] += row.calls * (row.measured_ms if timed else row.est_ms)
    return out


def print_report(before: list[Row], after: list[Row], red: dict, info: dict, args) -> None:
    timed = args.time
    print(f"FP8 quantisation census of one bench step: {args.variant}")
    print(f"small step on {args.device}: {args.layers} layers, {args.tokens} tokens, vocabulary {args.vocab}; built "
          f"in {info['build_s']:.1f} s, forward + backward + AdamW in {info['step_s']:.1f} s "
          f"({'exact' if args.exact else 'placeholder values'}); backend {'/'.join(info['backend'])}")  # fmt: skip
    print(f"scaled to the bench step: {BENCH_TOKENS} tokens, 1 dense + 7 MoE layers, routed buffer "
          f"{layout_rows(BENCH_TOKENS, DeepSeekConfig(**FULL_TRAIN_PLAN.config))} rows; 'before' is the step the "
          f"profile of 2026-12-04 ran (each transpose its own amax pass, rows plan (4, 2048, 8))\n")  # fmt: skip
    sb, sa = summarise(before, timed), summarise(after, timed)
    ms = "gpu_ms" if timed else "est_ms"
    print(f"{'operand':<17} {'calls':>5} {'launches':>10} {'GB 1-pass':>9} {'GB moved':>13} "
          f"{'GPU ms' if timed else 'est. ms':>13}  kernels (before -> after)")  # fmt: skip
    total = defaultdict(float)
    for role in sa:
        b, a = sb[role], sa[role]
        print(f"{role:<17} {a['calls']:>5} {b['launches']:>4} ->{a['launches']:>4} {a['GB']:>9.2f} "
              f"{b['GB_moved']:>5.1f} ->{a['GB_moved']:>5.1f} {b[ms]:>5.2f} ->{a[ms]:>5.2f}  "
              f"{b['plans']} -> {a['plans']}")  # fmt: skip
        for k in ("calls", "GB"):
            total[k] += a[k]
        for k in ("launches", "GB_moved", ms):
            total["b" + k] += b[k]
            total["a" + k] += a[k]
    print(f"{'total':<17} {int(total['calls']):>5} {int(total['blaunches']):>4} ->{int(total['alaunches']):>4} "
          f"{total['GB']:>9.2f} {total['bGB_moved']:>5.1f} ->{total['aGB_moved']:>5.1f} {total['b' + ms]:>5.2f} ->"
          f"{total['a' + ms]:>5.2f}")  # fmt: skip
    print(f"(GB 1-pass: bf16 read once, FP8 and scales written once; GB moved: with each extra read of the input. "
          f"At the copy ceiling ({COPY_CEILING_GBS} GB/s) one pass of everything takes "
          f"{total['GB'] / COPY_CEILING_GBS * 1e3:.2f} ms.)")  # fmt: skip
    kb, ka = kernel_families(before, timed), kernel_families(after, timed)
    print(f"\nagainst the profile of 2026-12-04 (a step: launches, ms; census {'measured' if timed else 'est.'}):")
    for family, prof in PROFILE.items():
        (nb, msb), (na, msa) = kb[family], ka[family]
        print(f"  {prof['kernel']:<22} profile {prof['launches']:>4} launches {prof['ms']:6.2f} ms | census before "
              f"{nb:>4} {msb:6.2f} ms | after {na:>4} {msa:6.2f} ms")  # fmt: skip
    memsets = sum(r.calls for r in after if r.plan[0] == "rows_amax")
    print(f"  (after: + {memsets} zero-fills of the column-amax buffers, 4 bytes a column)")
    weights = sum(r.calls * (r.measured_ms if timed else r.est_ms) for r in after if "weight" in r.role)
    print(f"\nweights (dense and experts, both orientations, after): {weights:.2f} ms a step. Quantised once per "
          f"optimizer step instead of once per forward, with k micro-batches an optimizer step: "
          f"{weights:.2f} * (k - 1) / k ms saved a micro-batch; at the bench (k = 1) nothing.")  # fmt: skip
    print("\nby module kind (ms a step, before -> after):")
    per_module = defaultdict(lambda: [0.0, 0.0])
    for i, rows in enumerate((before, after)):
        for row in rows:
            per_module[row.module_kind][i] += row.calls * (row.measured_ms if timed else row.est_ms)
    for kind, (b, a) in sorted(per_module.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:<32} {b:6.2f} -> {a:6.2f}")
    print("\nredundancy (after):")
    for k, v in red.items():
        if k != "examples":
            print(f"  {k}: {v}")
    for example in red["examples"]:
        print(f"    {example}")
    print("\nafter, per call at the bench shape (est. ms a call; the rate it assumes):")
    for r in sorted(after, key=lambda r: -r.calls * (r.measured_ms if timed else r.est_ms)):
        line = f"  {r.role:<17} {r.module_kind:<29} {str(list(r.shape)):<17} {str(r.plan):<38} x{r.calls:<3}"
        line += f" {r.est_ms:6.3f}" + (f" GPU {r.measured_ms:6.3f}" if timed else "") + f"  {r.gbs:.0f} {r.rate_source}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default=OURS_FP8_ROWWISE_TRITON_QUANT)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the small step (first one dense)")
    parser.add_argument("--tokens", type=int, default=40, help="tokens of the small step (one sequence)")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary of the small step (not FP8)")
    parser.add_argument("--device", default="cpu", help="where the small step runs (the emulated backend on CPU)")
    parser.add_argument("--exact", action="store_true", help="compute quantisations and GEMMs (minutes on a CPU)")
    parser.add_argument("--time", action="store_true", help="time each kernel at its bench shape (CUDA)")
    parser.add_argument("--sweep", action="store_true", help="time plans of rows_amax / cols_amax (CUDA)")
    parser.add_argument("--json", help="write the census here")
    args = parser.parse_args()
    small_dims = {args.tokens, layout_rows(args.tokens, DeepSeekConfig(**FULL_TRAIN_PLAN.config))}
    config_dims = {2048, 1536, 512, 576, 3072, 4096, 10944, 1408, 2816, 64, 192, 128, 16}
    if small_dims & config_dims:
        sys.exit(f"--tokens {args.tokens}: a token or routed-row count equal to a model dimension cannot be scaled")
    rec, config, info = run_small_step(args)
    before = scale_calls(rec.calls, config, args.tokens, before=True)
    after = scale_calls(rec.calls, config, args.tokens, before=False)
    red = redundancy(rec.calls)
    if args.time:
        time_rows(before)
        time_rows(after)
    print_report(before, after, red, info, args)
    sweep = sweep_pair() if args.sweep else None
    if args.json:
        record = {
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "info": info,
            "before": [asdict(r) for r in before], "after": [asdict(r) for r in after],
            "summary": {"before": summarise(before, args.time), "after": summarise(after, args.time)},
            "redundancy": red, "small_calls": [asdict(c) | {"key": None, "base_key": None} for c in rec.calls],
            "gemms": rec.gemms, "profile": PROFILE, "sweep": sweep,
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
