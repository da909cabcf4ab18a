"""Time the routed experts' matrix-vector kernels (`hf_deepseek/kernels/moe_gemv.py`) at the decode bench's expert
shapes for several launch configurations (`moe_gemv_config.KernelConfig`: BLOCK_N, BLOCK_K, warps, split-K, pipelining
stages), against torch's grouped GEMM on the same routing; the chosen experts' bytes over the time give the
bandwidth each reaches, also as a fraction of a device-to-device copy's (read + write bytes over its time) measured
first. Rows: P token-expert pairs as P tokens of one expert each (`--pairs`, the kernels' M), and the decode bench's
batches at top-6 (`--tokens`). On a CUDA machine with Triton:

    python benchmarks/moe_gemv_tune.py [--quick] [--fp8] [--down] [--json out.json]   # --down: its own down config
    python benchmarks/moe_gemv_tune.py --linear [--quick] [--head] [--json out.json]   # dense layers (and LM head)
    python benchmarks/moe_gemv_tune.py --quick --grouped --pairs --tokens 8 32   # larger batches against grouped_mm
    python benchmarks/moe_gemv_tune.py --grouped-kernels [--fp8] [--quick] [--json out.json]   # batch 32 and 5
    python benchmarks/moe_gemv_tune.py --linear-rows [--linear-tokens 32] [--json out.json]   # dense layers, 2-64 rows

`--grouped-kernels` times the expert-grouped kernels (`kernels/moe_grouped_gemv.py`, `moe_gemv_config.GroupedConfig`:
BLOCK_T, BLOCK_N, BLOCK_K, warps, stages) at 32 and 5 tokens x top-6 (192 and 30 pairs; `--tokens`), each with its
bookkeeping (the sort by expert), against torch's bf16 paths (grouped GEMM; decode's dense path over every expert)
or, with `--fp8`, against dequantising every expert then the grouped GEMM, and against the per-pair kernels; a
configuration is chosen by HF_DEEPSEEK_MOE_GROUPED_GEMV_CONFIG (..._FP8_CONFIG for FP8 weights) =
"BLOCK_T,BLOCK_N,BLOCK_K,WARPS,STAGES".

`--linear-rows` times the rows kernel (`kernels/linear_rows.py`: a dense layer's few dozen decode rows against its
weight, read once) per configuration at the bench's dense shapes, with bf16 weights against cuBLAS's F.linear and
with FP8 weights against what an FP8 layer runs without it (the activation quantised, then the FP8 GEMM:
`FP8InferenceLinear` without `weight_only_decode`); it ends with the configuration per kind of weight that takes
the least time over a decode step's dense layers, which HF_DEEPSEEK_LINEAR_ROWS_CONFIG (bf16) and
HF_DEEPSEEK_LINEAR_ROWS_FP8_CONFIG = "BLOCK_T,BLOCK_N,BLOCK_K,WARPS,STAGES" set.

`--quick` times the ~10 most promising configurations only, and the whole-K ones (`WHOLE_K`; about a minute on an
H100); a configuration is chosen for the decode step by HF_DEEPSEEK_MOE_GEMV_CONFIG="BLOCK_N,BLOCK_K,WARPS,SPLIT_K,
STAGES" (the experts; ..._FP8_CONFIG for FP8 weights) and HF_DEEPSEEK_LINEAR_GEMV_CONFIG /
HF_DEEPSEEK_LINEAR_GEMV_FP8_CONFIG (the dense layers: `--linear` ends with the one configuration per kind of weight
that takes the least time over a decode step's dense layers, `per_step` in the JSON). `--linear` times each kernel
over copies of its weight read in turn (`time_cold_us`), so that a 1-10 MB matrix is read from HBM as in a decode
step, not from L2 as when one copy is called again and again (which is how runs before 2026-12-05 timed it).
"""

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

from hf_deepseek.evals.bench import FULL_CONFIG
from hf_deepseek.evals.cuda_graph_timing import graph_time_us
from hf_deepseek.modeling.moe import count_per_expert

FIRST_WRITTEN = (32, 256, 4, 1, None)  # the kernels as first written; the speed-ups are against it
# The first configurations (one K loop per program, Triton's default loop), then split-K and pipelined ones.
CONFIGS = [
    (n, k, w, 1, None) for n, k, w in itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8)) if n * k <= 16384
]
CONFIGS += [(n, k, w, s, st) for (n, k), w, s, st in itertools.product(
    ((16, 256), (32, 128), (32, 256), (16, 512), (64, 128)), (4, 8), (1, 2, 4), (None, 2, 3))
    if (s, st) != (1, None)]  # fmt: skip
QUICK = [
    FIRST_WRITTEN,
    (32, 256, 4, 1, 3),  # cp.async pipelined K loop (Triton pipelines plain loads only with num_stages given)
    (16, 256, 4, 1, 3),
    (16, 512, 4, 1, 2),
    (32, 256, 4, 2, None),  # split-K: twice the programs
    (16, 256, 4, 2, 3),
    (32, 128, 4, 4, 3),
    (16, 256, 8, 4, None),
    (64, 128, 8, 1, 3),
    (8, 512, 4, 1, 2),
]
# small row blocks over the whole of K (one or two steps, every load in flight at once): 1.5-2.2x the first-written
# for the dense layers' FP8 rows on an H100 (2026-12-06e), where a layer's few MB are read in a few us
WHOLE_K = [(4, 2048, 4, 1, None), (8, 2048, 8, 1, None), (8, 1024, 4, 1, None), (4, 1024, 4, 1, 2),
           (16, 1024, 8, 1, None), (2, 2048, 4, 1, None)]  # fmt: skip


def time_us(fn, repeats: int = 200) -> float:
    """Microseconds per call, graphs of 20 calls replayed (as the decode step runs them: no launch overhead)."""
    return graph_time_us(fn, calls=20, replays=max(1, repeats // 20), warmup=10)


# what a timed graph's calls read in turn, through copies of their weights: 5x the 50 MB L2 of an H100 or H200, so
# each call reads its weights from HBM, as in a decode step (which reads ~2 GB), not the previous call's from L2
L2_FLUSH_BYTES = 1 << 28


def cold_variants(args: tuple, nbytes: int) -> list[tuple]:
    """`args` and copies of it (its tensors cloned), as many as make one pass over them read `L2_FLUSH_BYTES` when a
    call reads `nbytes`: 20 to 512 in all."""
    count = max(20, min(512, -(-L2_FLUSH_BYTES // max(1, nbytes))))
    return [args] + [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) for _ in range(count - 1)]


def time_cold_us(fn, args: tuple, nbytes: int, repeats: int = 200) -> float:
    """Microseconds per call of fn(*args) with its weights read from HBM: a graph of one call per `cold_variants`
    copy, replayed. A dense layer's 1-10 MB would otherwise stay in L2 across the graph's calls of one weight."""
    variants = cold_variants(args, nbytes)
    turn = itertools.cycle(variants)
    calls = len(variants)  # warm-up and capture each go round the copies once
    return graph_time_us(lambda: fn(*next(turn)), calls=calls, replays=max(1, repeats // calls), warmup=calls)


def copy_bandwidth_gb_s(nbytes: int = 1 << 30) -> float:
    """A device-to-device copy's read + write bytes per second (GB/s), the bandwidth the kernels are held against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), repeats=40)
    return 2 * nbytes / us / 1e3


def grouped(x, indices, weights, gate_up, down):
    top_k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = count_per_expert(flat, gate_up.shape[0])  # bincount reads back to the host: no CUDA graph
    offs = counts.cumsum(0).to(torch.int32)
    rows = x[order // top_k]
    gate, up = F.grouped_mm(rows, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    out = F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)
    return out


DOWN_APART = "triton gemv, down kernel apart"


def timed_launch(inputs, config, options: dict, want, label: str) -> tuple[float, float] | None:
    """(relative error against `want`, microseconds) of `_moe_gemv_triton.launch(*inputs, config, **options)`, or
    None for a configuration Triton cannot compile (reported and skipped)."""
    from hf_deepseek.kernels import _moe_gemv_triton

    try:
        out = _moe_gemv_triton.launch(*inputs, config, **options).float()
        error = ((out - want).norm() / want.norm()).item()
        return error, time_us(lambda: _moe_gemv_triton.launch(*inputs, config, **options))
    except Exception as exc:
        print(f"  {label}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None


def down_apart_rows(rows, label, inputs, scales, configs, want, nbytes, copy) -> list[dict]:
    """`--down`: the case's fastest one-configuration launch (gate/up and down alike, unsummed) with each of
    `configs` for the down kernel alone (`launch(..., down_config=)`), which `HF_DEEPSEEK_MOE_GEMV_FP8_DOWN_CONFIG` /
    `..._DOWN_CONFIG` set: rows of kernel DOWN_APART with `config` (gate/up's) and `down_config`."""
    ok = [r for r in rows if r["case"] == label and r.get("kernel") == "triton gemv" and r["error"] < 1e-2]
    if not ok:
        return []
    gate = tuple(min(ok, key=lambda r: r["us"])["config"])
    found = []
    for down_config in configs:
        timed = timed_launch(
            inputs, gate, dict(scales, down_config=down_config), want, f"gate/up {gate}, down {down_config}"
        )
        if timed is None:
            continue
        error, us = timed
        gb_s = nbytes / us / 1e3
        found.append(dict(case=label, kernel=DOWN_APART, config=gate, down_config=down_config, us=us, gb_s=gb_s,
                          of_copy=gb_s / copy, error=error))  # fmt: skip
        print(f"  gate/up {gate}, down {down_config}: {us:6.1f} us {gb_s:5.0f} GB/s err {error:.1e}", flush=True)
    return found


def fp8_weights(gate_up, down):
    """The same shapes in FP8 with unit 128x128 block scales (timing only: the bytes and the kernels' work)."""
    experts, two_inter, dim = gate_up.shape
    g_i, g_d = -(-two_inter // 2 // 128), -(-dim // 128)
    gate_up_scale = torch.ones(experts, 2 * g_i, g_d, device="cuda")
    down_scale = torch.ones(experts, g_d, g_i, device="cuda")
    return gate_up.to(torch.float8_e4m3fn), down.to(torch.float8_e4m3fn), gate_up_scale, down_scale


def linear_shapes(config: dict) -> list[tuple[str, int, int, int]]:
    """The bench config's dense layers at decode as (name, N, K, launches a decode step): what `linear_gemv_fp8`
    serves with FP8 weights and `HF_DEEPSEEK_LINEAR_GEMV=1` with bf16 (the MLA projections but kv_b, which decode
    folds into the query and output; the shared experts' and the dense MLP's gate / up and down; not the LM head)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    q_head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    shared = config["n_shared_experts"] * config["moe_intermediate_size"]
    layers, dense = config["num_hidden_layers"], config["first_k_dense_replace"]
    return [
        ("q_a", config["q_lora_rank"], hidden, layers),
        ("kv_a", config["kv_lora_rank"] + config["qk_rope_head_dim"], hidden, layers),
        ("q_b", heads * q_head, config["q_lora_rank"], layers),
        ("o_proj", hidden, heads * config["v_head_dim"], layers),
        ("shared gate / up", shared, hidden, 2 * (layers - dense)),
        ("shared down", hidden, shared, layers - dense),
        ("dense gate / up", config["intermediate_size"], hidden, 2 * dense),
        ("dense down", hidden, config["intermediate_size"], dense),
    ]


HEAD = "lm head"  # `--head`: the LM head's shape too, with a configuration of its own (HEAD_FP8_CONFIG)


def head_shape(config: dict) -> tuple[str, int, int, int]:
    """The LM head at decode as `linear_shapes` gives a dense layer: (name, vocab, hidden, one launch a step)."""
    return (HEAD, config["vocab_size"], config["hidden_size"], 1)


def fastest_over_step(rows: list[dict], kernel: str, shapes: int) -> dict | None:
    """The configuration of `kernel`'s rows with the least time over a decode step (each shape's time x its launches
    a step) among those right (error < 1e-2) at all `shapes` shapes: {"config", "us"}, or None."""
    totals: dict[tuple, list[float]] = {}
    for r in rows:
        if r["kernel"] == kernel and r["error"] < 1e-2:
            totals.setdefault(tuple(r["config"]), []).append(r["us"] * r["launches"])
    complete = {c: sum(t) for c, t in totals.items() if len(t) == shapes}
    if not complete:
        return None
    config = min(complete, key=complete.get)
    return {"config": list(config), "us": complete[config]}


def per_step(rows: list[dict]) -> dict:
    """The dense layers' matrix-vector time of one decode step (us, each shape's time x its launches a step): cuBLAS
    bf16, and per kind of weight the one configuration with the least such time among those that ran (and were
    right) at every shape, which is what `HF_DEEPSEEK_LINEAR_GEMV_CONFIG` / `..._FP8_CONFIG` can set. The LM head
    (`--head`) is left out of that sum: its own fastest FP8 configuration is `head_fp8`, what
    `HF_DEEPSEEK_HEAD_GEMV_FP8_CONFIG` sets, with cuBLAS's bf16 head beside it (`head_cublas_bf16`)."""
    head = [r for r in rows if r["case"].startswith(HEAD)]
    rows = [r for r in rows if not r["case"].startswith(HEAD)]
    cublas = [r for r in rows if r["kernel"] == "cuBLAS bf16 F.linear"]
    summary = {"cuBLAS bf16": sum(r["us"] * r["launches"] for r in cublas)}
    for kind in ("bf16", "fp8"):
        if best := fastest_over_step(rows, f"triton {kind} linear", len(cublas)):
            summary[kind] = best
    if best := fastest_over_step(head, "triton fp8 linear", 1):
        summary["head_fp8"] = best
        summary["head_cublas_bf16"] = next(r["us"] for r in head if r["kernel"] == "cuBLAS bf16 F.linear")
    return summary


# small-N shapes fill the GPU only with smaller row blocks or split-K programs; a dense layer's few MB are read in
# a few us, so the K loop's serial steps show: whole-K blocks (one or two steps, every load in flight at once)
LINEAR_CONFIGS = QUICK + [(16, 256, 4, 2, 3), (16, 256, 4, 4, 3), (8, 256, 4, 1, 3), (16, 128, 4, 1, 4)] + WHOLE_K


def linear_rows(args, copy: float) -> list[dict]:
    """Linear layers at decode: `launch_linear` per configuration, FP8 weights (unit block scales) and bf16
    weights, against cuBLAS's bf16 F.linear."""
    from hf_deepseek.kernels import _moe_gemv_triton
    from hf_deepseek.kernels.fp8_blocks import dequantize_blocks

    rows = []
    configs = LINEAR_CONFIGS if args.quick else CONFIGS + LINEAR_CONFIGS[len(QUICK) :]
    for name, n, k, launches in linear_shapes(FULL_CONFIG) + ([head_shape(FULL_CONFIG)] if args.head else []):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        q, scale = w.to(torch.float8_e4m3fn), torch.ones(-(-n // 128), -(-k // 128), device="cuda")
        weights = {"fp8": (q, scale, dequantize_blocks(q, scale).to(torch.bfloat16)), "bf16": (w, None, w)}
        for tokens in args.linear_tokens:
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            label = f"{name} [{n}, {k}] x {tokens}"
            with torch.no_grad():
                base = time_cold_us(F.linear, (x, w), w.nbytes)
                rows.append(dict(case=label, kernel="cuBLAS bf16 F.linear", us=base, gb_s=n * k * 2 / base / 1e3,
                                 launches=launches))  # fmt: skip
                print(f"{label}: cuBLAS bf16 {base:.1f} us", flush=True)
                for kind, (weight, scales, full) in weights.items():
                    want = F.linear(x, full).float()
                    for config in configs:
                        call = (x, weight, scales, config)
                        try:
                            error = ((_moe_gemv_triton.launch_linear(*call).float() - want).norm() / want.norm()).item()
                            us = time_cold_us(_moe_gemv_triton.launch_linear, call, weight.nbytes)
                        except Exception as exc:
                            print(f"  {kind} {config}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                            continue
                        gb_s = n * k * weight.element_size() / us / 1e3
                        row = dict(case=f"{label} {kind}", kernel=f"triton {kind} linear", config=config, us=us,
                                   launches=launches)  # fmt: skip
                        rows.append(row | dict(gb_s=gb_s, of_copy=gb_s / copy, error=error, x_cublas_bf16=base / us))
                        flag = "" if error < 1e-2 else "  WRONG"
                        print(f"  {kind} {config}: {us:6.1f} us {gb_s:5.0f} GB/s, {base / us:.2f}x cuBLAS bf16{flag}",
                              flush=True)  # fmt: skip
    return rows


# the expert-grouped kernels: (BLOCK_T, BLOCK_N, BLOCK_K, warps, stages); BLOCK_T < 16 multiplies on the CUDA cores
GROUPED_QUICK = [
    (16, 32, 128, 4, 3),  # the untuned default
    (16, 16, 128, 4, 3),
    (16, 64, 128, 4, 3),
    (16, 64, 64, 4, 4),
    (16, 128, 64, 8, 3),
    (32, 32, 128, 4, 3),
    (16, 32, 128, 4, None),
    (8, 16, 128, 4, 3),
    (4, 32, 64, 4, 3),
]
GROUPED_CONFIGS = [
    (t, n, k, w, st)
    for t, n, k, w, st in itertools.product((4, 8, 16, 32), (16, 32, 64, 128), (64, 128, 256), (4, 8), (None, 3, 4))
    if t >= 16 or t * n * k <= 16384  # the broadcast product's [T, N, K] tile in registers
]


# the rows kernel: (BLOCK_T, BLOCK_N, BLOCK_K, warps, stages); fewer weight rows a program mean more programs but
# more re-reads of the activation tile from L2
LINEAR_ROWS_CONFIGS = [
    (32, 16, 128, 4, 3),  # the untuned default
    (32, 32, 128, 4, 3),
    (32, 64, 128, 4, 3),
    (32, 16, 64, 4, 4),
    (16, 16, 128, 4, 3),
    (64, 16, 128, 4, 3),
    (64, 32, 128, 8, 3),
    (32, 32, 64, 4, 4),
    (32, 16, 128, 4, None),
]
BASELINES = {"bf16": "cuBLAS bf16 F.linear", "fp8": "FP8 GEMM path"}


def linear_rows_rows(args) -> list[dict]:
    """The rows kernel per configuration and kind of weight at the bench's dense shapes and `args.linear_tokens` rows
    (default 32), against each kind's baseline (`BASELINES`); each row's error against float64."""
    from hf_deepseek.kernels import _linear_rows_triton
    from hf_deepseek.modeling.fp8 import FP8InferenceLinear

    rows = []
    for name, n, k, launches in linear_shapes(FULL_CONFIG):
        dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = FP8InferenceLinear.from_linear(dense)
        gemm = FP8InferenceLinear.from_linear(dense)
        gemm.fp8_recipe = type(gemm.fp8_recipe)(weight_only_decode=False)
        kinds = {  # (the kernel's weight arguments, the baseline, the weight in float64)
            "bf16": ((dense.weight, None), lambda x, w=dense.weight: F.linear(x, w), dense.weight.double()),
            "fp8": ((layer.weight, layer.weight_scale_inv), gemm, layer.dequantized(torch.float64).weight),
        }
        for tokens in args.linear_tokens:
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            for kind, (weights, baseline, full) in kinds.items():
                label = f"{name} [{n}, {k}] x {tokens} {kind}"
                want = x.double() @ full.T
                with torch.no_grad():
                    base = time_us(lambda x=x, f=baseline: f(x))
                    rows.append(dict(case=label, kernel=BASELINES[kind], us=base, launches=launches))
                    print(f"{label}: {BASELINES[kind]} {base:.1f} us", flush=True)
                    for config in LINEAR_ROWS_CONFIGS:
                        call = (x, *weights, config)
                        try:
                            got = _linear_rows_triton.launch(*call).double()
                            us = time_us(lambda a=call: _linear_rows_triton.launch(*a))
                        except Exception as exc:
                            print(f"  {config}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                            continue
                        error = ((got - want).norm() / want.norm()).item()
                        rows.append(dict(case=label, kernel=f"triton {kind} rows", config=config, us=us,
                                         launches=launches, error=error))  # fmt: skip
                        flag = "" if error < 1e-2 else "  WRONG"
                        print(f"  {config}: {us:6.1f} us, {base / us:.2f}x {BASELINES[kind]}{flag}", flush=True)
    return rows


def rows_per_step(rows: list[dict]) -> dict:
    """A decode step's dense layers (us, each shape's time x its launches a step) per baseline and, per kind of
    weight, the rows kernel's one configuration with the least such time among those right at every shape."""
    summary = {}
    for kind, baseline in BASELINES.items():
        base = [r for r in rows if r["kernel"] == baseline]
        summary[baseline] = sum(r["us"] * r["launches"] for r in base)
        if best := fastest_over_step(rows, f"triton {kind} rows", len(base)):
            summary[f"{kind} rows"] = best
    return summary


def torch_paths(x, indices, weights, gate_up, down, scales: dict) -> dict:
    """What the grouped kernels replace, as calls timed beside them: the per-pair kernels (default configuration);
    bf16: torch's grouped GEMM and decode's dense path over every expert; FP8: every expert dequantised, then the
    grouped GEMM (what FP8 experts did beyond MAX_PAIRS)."""
    from types import SimpleNamespace

    from hf_deepseek.kernels import _moe_gemv_triton
    from hf_deepseek.kernels.fp8_blocks import dequantize_experts
    from hf_deepseek.modeling.moe_decode import dense_experts

    paths = {"per-pair kernels": lambda: _moe_gemv_triton.launch(x, indices, weights, gate_up, down, **scales)}
    if scales:
        fp8 = (gate_up, scales["gate_up_scale"], down, scales["down_scale"])
        paths["dequantise + grouped_mm"] = lambda: grouped(
            x, indices, weights, *(w.to(torch.bfloat16) for w in dequantize_experts(*fp8))
        )
    else:
        dense = SimpleNamespace(gate_up_proj=gate_up, down_proj=down, act_fn=F.silu, num_experts=gate_up.shape[0])
        paths["torch grouped_mm"] = lambda: grouped(x, indices, weights, gate_up, down)
        paths["dense (every expert)"] = lambda: dense_experts(dense, x, indices, weights)
    return paths


def grouped_kernel_rows(args, copy: float) -> dict:
    """The expert-grouped kernels per configuration at `args.tokens` tokens x top-6 of 64 experts (default 32, 5),
    against `torch_paths` on the same weights and routing."""
    from hf_deepseek.kernels import _moe_grouped_gemv_triton, moe_gemv
    from hf_deepseek.kernels.fp8_blocks import dequantize_experts

    experts, dim, inter, top_k = 64, args.dim, args.inter, 6
    gate_up = torch.randn(experts, 2 * inter, dim, device="cuda", dtype=torch.bfloat16) * dim**-0.5
    down = torch.randn(experts, dim, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    scales, full = {}, (gate_up, down)
    if args.fp8:
        gate_up, down, gate_up_scale, down_scale = fp8_weights(gate_up, down)
        scales = dict(gate_up_scale=gate_up_scale, down_scale=down_scale)
        full = dequantize_experts(gate_up, gate_up_scale, down, down_scale)
    kind = "fp8" if args.fp8 else "bf16"
    baseline = "dequantise + grouped_mm" if args.fp8 else "torch grouped_mm"
    configs = [
        c for c in (GROUPED_QUICK if args.quick else GROUPED_CONFIGS) if not args.fp8 or 128 % c[1] == 128 % c[2] == 0
    ]
    results = {"shape": dict(experts=experts, dim=dim, inter=inter, top_k=top_k, fp8=args.fp8), "copy_gb_s": copy,
               "rows": [], "best": {}}  # fmt: skip
    print(f"copy bandwidth {copy:.0f} GB/s (read + write); {len(configs)} configurations, {kind} weights", flush=True)
    for tokens in args.tokens if args.tokens is not None else [32, 5]:
        label = f"{tokens} tokens x top-{top_k} ({tokens * top_k} pairs)"
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        indices = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, device="cuda").softmax(-1)
        nbytes = indices.unique().numel() * 3 * inter * dim * gate_up.element_size()
        inputs = (x, indices, weights, gate_up, down)
        print(f"{label}: {nbytes / 1e6:.1f} MB of weights", flush=True)
        with torch.no_grad():
            want = moe_gemv.reference(x, indices, weights, *full, act_dtype=x.dtype).float()
            base = {name: time_us(fn) for name, fn in torch_paths(*inputs, scales).items()}
            for name, us in base.items():
                results["rows"].append(dict(case=label, kernel=name, us=us, gb_s=nbytes / us / 1e3))
                print(f"  {name}: {us:6.1f} us {nbytes / us / 1e3:5.0f} GB/s", flush=True)
            for config in configs:
                try:
                    out = _moe_grouped_gemv_triton.launch(*inputs, config, **scales).float()
                    error = ((out - want).norm() / want.norm()).item()
                    us = time_us(lambda c=config, a=inputs: _moe_grouped_gemv_triton.launch(*a, c, **scales))
                except Exception as exc:  # a configuration Triton cannot compile (or FP8 refuses) is reported
                    print(f"  {config}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                gb_s = nbytes / us / 1e3
                row = dict(case=label, kernel=f"triton grouped {kind}", config=config, us=us, gb_s=gb_s,
                           of_copy=gb_s / copy, error=error, speedup=base[baseline] / us)  # fmt: skip
                results["rows"].append(row)
                flag = "" if error < 1e-2 else "  WRONG"
                print(f"  {config}: {us:6.1f} us {gb_s:5.0f} GB/s ({gb_s / copy:4.0%} of copy), {row['speedup']:.2f}x "
                      f"{baseline}, {base['per-pair kernels'] / us:.2f}x per-pair, err {error:.1e}{flag}",
                      flush=True)  # fmt: skip
        ok = [r for r in results["rows"] if r["case"] == label and "config" in r and r["error"] < 1e-2]
        if ok:
            results["best"][label] = best = min(ok, key=lambda r: r["us"])
            print(f"best {label}: {best['config']} {best['us']:.1f} us, {best['speedup']:.2f}x {baseline}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="the ~10 most promising configurations, no grouped_mm")
    parser.add_argument("--fp8", action="store_true", help="FP8 weights with block scales (the SCALED kernels)")
    parser.add_argument("--pairs", type=int, nargs="*", default=[1, 4, 8, 32], help="P pairs: P tokens, top-1")
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="tokens at top-6 (default 1 4; quick: 1)")
    parser.add_argument("--grouped", action="store_true", help="torch's grouped GEMM too with --quick (bf16)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=1408)
    parser.add_argument("--linear", action="store_true", help="linear layers (the bench's dense shapes) only")
    parser.add_argument("--down", action="store_true", help="experts: the down kernel's configuration apart too")
    parser.add_argument("--head", action="store_true", help="with --linear: the LM head's shape too (its own best)")
    parser.add_argument("--linear-tokens", type=int, nargs="*", default=None, help="rows (default 1; --linear-rows 32)")
    parser.add_argument("--linear-rows", action="store_true", help="the rows kernel at the bench's dense shapes")
    parser.add_argument("--grouped-kernels", action="store_true", help="the expert-grouped kernels (batch 32, 5)")
    args = parser.parse_args()
    args.linear_tokens = args.linear_tokens or ([32] if args.linear_rows else [1])
    started = time.time()
    if args.linear_rows:
        results = {"rows": linear_rows_rows(args)}
        results["per_step"] = summary = rows_per_step(results["rows"])
        print(f"a decode step's dense layers, rows {args.linear_tokens}: " + "; ".join(
            f"{k} {v['config']} {v['us']:.0f} us" if isinstance(v, dict) else f"{k} {v:.0f} us"
            for k, v in summary.items()))  # fmt: skip
        print(f"{time.time() - started:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if args.grouped_kernels:
        results = grouped_kernel_rows(args, copy_bandwidth_gb_s())
        print(f"{time.time() - started:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if args.linear:
        copy = copy_bandwidth_gb_s()
        results = {"copy_gb_s": copy, "rows": linear_rows(args, copy)}
        for label in dict.fromkeys(r["case"] for r in results["rows"]):
            ok = [r for r in results["rows"] if r["case"] == label and "config" in r and r["error"] < 1e-2]
            if ok:
                best = min(ok, key=lambda r: r["us"])
                first = next((r for r in ok if tuple(r["config"]) == FIRST_WRITTEN), None)
                than_first = f", {first['us'] / best['us']:.2f}x the first-written" if first else ""
                print(f"best {label}: {best['config']} {best['us']:.1f} us, {best['x_cublas_bf16']:.2f}x cuBLAS bf16"
                      f"{than_first}")  # fmt: skip
        results["per_step"] = summary = per_step(results["rows"])
        line = f"a decode step's dense layers, tokens {args.linear_tokens}: cuBLAS bf16 {summary['cuBLAS bf16']:.0f} us"
        for kind in ("bf16", "fp8"):
            if kind in summary:
                line += f"; {kind} {summary[kind]['config']} {summary[kind]['us']:.0f} us"
        if "head_fp8" in summary:
            best = summary["head_fp8"]
            line += f"; the FP8 LM head {best['config']} {best['us']:.0f} us (cuBLAS bf16 "
            line += f"{summary['head_cublas_bf16']:.0f} us)"
        print(line)
        print(f"{time.time() - started:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    from hf_deepseek.kernels import moe_gemv

    tokens_list = args.tokens if args.tokens is not None else ([1] if args.quick else [1, 4])
    configs = (QUICK if args.quick else CONFIGS) + WHOLE_K
    experts, dim, inter, top_k = 64, args.dim, args.inter, 6
    gate_up = torch.randn(experts, 2 * inter, dim, device="cuda", dtype=torch.bfloat16) * dim**-0.5
    down = torch.randn(experts, dim, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    copy = copy_bandwidth_gb_s()
    print(f"copy bandwidth {copy:.0f} GB/s (read + write); {len(configs)} configurations", flush=True)
    shape = dict(experts=experts, dim=dim, inter=inter, top_k=top_k, fp8=args.fp8)
    results = {"shape": shape, "copy_gb_s": copy, "rows": []}
    cases = [(f"{p} pairs", p, 1) for p in args.pairs] + [(f"{t} tokens x top-{top_k}", t, top_k) for t in tokens_list]
    scales = {}
    if args.fp8:
        gate_up, down, gate_up_scale, down_scale = fp8_weights(gate_up, down)
        scales = dict(gate_up_scale=gate_up_scale, down_scale=down_scale)
    element = gate_up.element_size()
    if args.fp8:
        from hf_deepseek.kernels.fp8_blocks import dequantize_experts

        full = dequantize_experts(gate_up, scales["gate_up_scale"], down, scales["down_scale"])
    for label, tokens, k in cases:
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        if k == 1:  # P distinct experts, one per token
            indices = torch.randperm(experts, device="cuda")[:tokens, None]
        else:
            indices = torch.stack([torch.randperm(experts, device="cuda")[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k, device="cuda").softmax(-1)
        distinct = indices.unique().numel()
        nbytes = distinct * 3 * inter * dim * element
        if args.fp8:
            want = moe_gemv.reference(x, indices, weights, *full, act_dtype=x.dtype).float()
        else:
            want = moe_gemv.reference(x, indices, weights, gate_up, down).float()
        inputs = (x, indices, weights, gate_up, down)
        with torch.no_grad():
            if (args.grouped or not args.quick) and not args.fp8:
                base = time_us(lambda args=inputs: grouped(*args))
                gb_s = nbytes / base / 1e3
                results["rows"].append(dict(case=label, kernel="torch grouped_mm", us=base, gb_s=gb_s))
                print(f"{label}: grouped_mm {base:.1f} us ({gb_s:.0f} GB/s, {gb_s / copy:.0%} of copy)", flush=True)
            print(f"{label}: {nbytes / 1e6:.1f} MB of weights", flush=True)
            # at top-k > 1 without split-K, also with the down kernel summing each token's top-k itself
            unsplit = [c for c in configs if len(c) < 4 or c[3] == 1]
            variants = [(c, False) for c in configs] + ([(c, True) for c in unsplit] if k > 1 else [])
            for config, summed in variants:
                timed = timed_launch(inputs, config, dict(scales, sum_top_k=summed), want, str(config))
                if timed is None:
                    continue
                error, us = timed
                gb_s = nbytes / us / 1e3
                kernel = "triton gemv, top-k summed in kernel" if summed else "triton gemv"
                row = dict(case=label, kernel=kernel, config=config, us=us, gb_s=gb_s, of_copy=gb_s / copy)
                results["rows"].append(row | dict(error=error))
                flag = "" if error < 1e-2 else "  WRONG"
                print(f"  {config}{' summed' if summed else ''}: {us:6.1f} us {gb_s:5.0f} GB/s ({gb_s / copy:4.0%} of "
                      f"copy) err {error:.1e}{flag}", flush=True)  # fmt: skip
            if args.down:
                results["rows"] += down_apart_rows(results["rows"], label, inputs, scales, configs, want, nbytes, copy)
    best = {}
    for label, *_ in cases:
        rows = [r for r in results["rows"] if r["case"] == label and "config" in r and r["error"] < 1e-2]
        if rows:
            best[label] = min(rows, key=lambda r: r["us"])
            default = next((r for r in rows if tuple(r["config"]) == FIRST_WRITTEN), None)
            speedup = f", {default['us'] / best[label]['us']:.2f}x the first-written" if default else ""
            summed = " (top-k summed in kernel)" if "summed" in best[label]["kernel"] else ""
            if "down_config" in best[label]:
                summed += f", down kernel {best[label]['down_config']}"
            print(f"best {label}: {best[label]['config']}{summed} {best[label]['us']:.1f} us{speedup}")
    results["best"] = best
    print(f"{time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
