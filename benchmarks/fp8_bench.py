"""Forward+backward of DeepSeek-V3-shaped linear layers and a routed-expert layer: block-scaled FP8 (this package's
recipe: 1x128 activation tiles, 128x128 weight blocks, all three GEMMs in FP8) against BF16, in the same run.

    python benchmarks/fp8_bench.py --json fp8_bench.json

It ends with the rowwise recipe's quantisers at the training bench's shapes (2 x --tokens rows), per operand kind
(activations, their transposes along the tokens, batched expert weights and their transposes, the transposes of a
MoE layer's dense weights): the Triton kernel against Inductor's compiled torch operations, in GB/s.
`--quantisers-only` times just those, each kernel plan of a small sweep too, and checks each result bit for bit
against `quantize_rowwise`:

    python benchmarks/fp8_bench.py --quantisers-only --json quantisers.json

Needs a CUDA GPU of compute capability 9.0 (Hopper). Times are medians of `triton.testing.do_bench` (L2 flushed
between repetitions). TFLOP/s count the three GEMMs: 6 * M * N * K per linear layer.
"""

import argparse
import json

import torch
from torch import nn
from triton.testing import do_bench

from hf_deepseek import DeepSeekConfig
from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training
from hf_deepseek.modeling.moe import RoutedExperts

# DeepSeek-V3 (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, dense MLP 18432, expert 2048): name, in, out
LINEARS = [
    ("q_a_proj", 7168, 1536),
    ("q_b_proj", 1536, 24576),
    ("kv_a_proj_with_mqa", 7168, 576),
    ("kv_b_proj", 512, 32768),
    ("o_proj", 16384, 7168),
    ("dense gate/up_proj", 7168, 18432),
    ("dense down_proj", 18432, 7168),
    ("shared expert gate/up_proj", 7168, 2048),
    ("shared expert down_proj", 2048, 7168),
]
VARIANTS = {
    "fp8": FP8Recipe(),
    "fp8 finite check": FP8Recipe(check_finite=True),
    "fp8 triton gemm": FP8Recipe(gemm="triton"),
}


def time_fwd_bwd(module, inputs: tuple, grad: torch.Tensor, params: list[torch.Tensor]) -> float:
    def step():
        for p in params:
            p.grad = None
        module(*inputs).backward(grad)

    return do_bench(step, warmup=25, rep=200, return_mode="median")


def bench_linear(name: str, k: int, n: int, tokens: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    layer = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    flops = 6 * tokens * n * k
    row = {"layer": name, "M": tokens, "K": k, "N": n, "ms": {}}
    row["ms"]["bf16"] = time_fwd_bwd(layer, (x,), dy, [x, layer.weight])
    for variant, recipe in VARIANTS.items():
        convert_to_fp8_training(layer, recipe)
        row["ms"][variant] = time_fwd_bwd(layer, (x,), dy, [x, layer.weight])
        layer.__class__ = nn.Linear
    row["tflops"] = {v: flops / ms / 1e9 for v, ms in row["ms"].items()}
    return row


def bench_experts(tokens: int, experts: int, top_k: int) -> dict:
    cfg = DeepSeekConfig(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=experts, n_group=1,
                         topk_group=1, num_experts_per_tok=top_k)  # fmt: skip
    module = RoutedExperts(cfg).to("cuda", torch.bfloat16)
    nn.init.normal_(module.gate_up_proj, std=0.01)
    nn.init.normal_(module.down_proj, std=0.02)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(tokens, 7168, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    indices = torch.rand(tokens, experts, device="cuda", generator=gen).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, device="cuda", generator=gen)
    dy = torch.randn_like(x)
    params = [x, module.gate_up_proj, module.down_proj]
    flops = 6 * tokens * top_k * 3 * 7168 * 2048
    row = {"layer": f"routed experts E={experts} top-{top_k}", "M": tokens * top_k, "K": 7168, "N": 2048, "ms": {}}
    row["ms"]["bf16"] = time_fwd_bwd(module, (x, indices, weights), dy, params)
    for variant in ("fp8", "fp8 finite check"):
        convert_to_fp8_training(module, VARIANTS[variant])
        row["ms"][variant] = time_fwd_bwd(module, (x, indices, weights), dy, params)
        module.__class__ = RoutedExperts
    row["tflops"] = {v: flops / ms / 1e9 for v, ms in row["ms"].items()}
    return row


def breakdown(tokens: int, k: int, n: int) -> dict:
    """Median ms of each piece of one FP8 linear's forward+backward (the o_proj shape by default)."""
    from hf_deepseek.modeling.fp8 import get_backend

    cublas, triton_only = (
        get_backend(FP8Recipe(), torch.device("cuda")),
        get_backend(VARIANTS["fp8 triton gemm"], torch.device("cuda")),
    )
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    x_q, x_s = cublas.quantize_rows(x)
    w_q, w_s = cublas.quantize_weight(w)
    xt_q, xt_s = cublas.quantize_rows(x.t())
    dyt_q, dyt_s = cublas.quantize_rows(torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, generator=gen).t())
    parts = {
        "quantize x (1x128 rows)": lambda: cublas.quantize_rows(x),
        "quantize x^T (1x128 along tokens)": lambda: cublas.quantize_rows(x.t()),
        "quantize w (128x128) + w^T": lambda: cublas.quantize_weight_t(w, *cublas.quantize_weight(w)),
        "fwd GEMM cuBLAS 1x128 x 128x128": lambda: cublas.gemm(x_q, x_s, w_q, w_s, True, torch.bfloat16),
        "fwd GEMM Triton 1x128 x 128x128": lambda: triton_only.gemm(x_q, x_s, w_q, w_s, True, torch.bfloat16),
        "wgrad GEMM cuBLAS 1x128 x 1x128 (fp32 out)": lambda: cublas.gemm(
            dyt_q, dyt_s, xt_q, xt_s, False, torch.float32
        ),
        "bf16 fwd GEMM": lambda: x @ w.T,
    }
    return {name: do_bench(fn, warmup=10, rep=100, return_mode="median") for name, fn in parts.items()}


def bench_grouped(tokens: int, experts: int, top_k: int) -> dict:
    """Median ms of the grouped FP8 GEMMs of the expert layer (gate_up shape) and of bf16 grouped_mm."""
    from hf_deepseek.modeling.fp8 import expert_layout, get_backend

    backend = get_backend(FP8Recipe(), torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(3)
    indices = torch.rand(tokens, experts, device="cuda", generator=gen).topk(top_k, dim=-1).indices
    layout = expert_layout(indices, experts)
    x_pad = torch.randn(layout.rows, 7168, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(experts, 4096, 7168, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.01
    x_q, x_s = backend.quantize_rows(x_pad)
    w_q, w_s = backend.quantize_weight(w)
    xt_q, xt_s = backend.quantize_rows(x_pad.t())
    dyt_q, dyt_s = backend.quantize_rows(torch.randn(layout.rows, 4096, device="cuda", dtype=torch.bfloat16).t())
    offs = torch.bincount(indices.flatten(), minlength=experts).cumsum(0).int()
    x_sorted = x_pad[: tokens * top_k]
    parts = {
        "quantize x_pad rows": lambda: backend.quantize_rows(x_pad),
        "quantize x_pad^T": lambda: backend.quantize_rows(x_pad.t()),
        "quantize expert weights + transposes": lambda: backend.quantize_weight_t(w, *backend.quantize_weight(w)),
        "grouped fwd GEMM (Triton)": lambda: backend.grouped_gemm(x_q, x_s, w_q, w_s, layout, torch.bfloat16),
        "grouped wgrad GEMM (Triton)": lambda: backend.grouped_wgrad(dyt_q, dyt_s, xt_q, xt_s, layout),
        "bf16 grouped_mm fwd": lambda: torch.nn.functional.grouped_mm(x_sorted, w.transpose(1, 2), offs=offs),
    }
    return {name: do_bench(fn, warmup=10, rep=100, return_mode="median") for name, fn in parts.items()}


def quantiser_operands(tokens: int) -> dict:
    """The rowwise recipe's operands at the training bench's shapes (hidden 2048, 64 experts of width 1408, top-6):
    operand kind -> tensor. C-contiguous ones run the "rows" kernel, transposed views "cols" or "cols_split"."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16, generator=gen)
    routed = torch.randn(6 * tokens, 2048, device="cuda", dtype=torch.bfloat16, generator=gen)
    gate_up = torch.randn(64, 2816, 2048, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    down = torch.randn(64, 2048, 1408, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    # a MoE layer's dense weights (MLA's q_a, kv_b and o, the shared experts' down), whose transposes the input
    # gradient takes: 120 of the column kernel's 134 launches in the default FP8 step (H100, 2026-12-06), most of
    # them two-pass "cols_split" plans over 32-128 strips
    shapes = (("q_a", 1536, 2048), ("kv_b", 4096, 512), ("o", 2048, 2048), ("shared down", 2048, 2816))
    dense = {
        name: 0.02 * torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) for name, n, k in shapes
    }
    return {
        **{f"{name} weight^T [{w.shape[1]}, {w.shape[0]}] (transposed)": w.t() for name, w in dense.items()},
        f"activations [{tokens}, 2048] (rows)": x,
        f"activations^T [2048, {tokens}] (transposed, along the tokens)": x.t(),
        f"routed rows^T [2048, {6 * tokens}] (transposed, along the tokens)": routed.t(),
        "gate_up weights [64, 2816, 2048] (batched rows)": gate_up,
        "gate_up weights^T [64, 2048, 2816] (batched, transposed)": gate_up.transpose(1, 2),
        "down weights [64, 2048, 1408] (batched rows)": down,
        "down weights^T [64, 1408, 2048] (batched, transposed)": down.transpose(1, 2),
    }


def candidate_plans(t: torch.Tensor):
    """The default plan, then the alternatives worth timing for this operand kind."""
    from hf_deepseek.modeling.fp8_triton import RowwisePlan, rowwise_plan

    rows, cols = t.shape[-2:]
    default = rowwise_plan(t, rows, cols)
    plans = [default]
    if default.kind == "rows":
        for block_r in (1, 2, 4, 8, 16):
            for warps in (4, 8, 16):
                if block_r * default.block_c <= 16384 and 16 <= block_r * default.block_c // (32 * warps) <= 64:
                    plans.append(RowwisePlan("rows", block_r, default.block_c, warps))
        plans.append(RowwisePlan("rows_loop", 4, 1024, 8))
    else:  # small tiles and short chunks too: a dense weight's transpose has only 32-128 strips of rows
        for block_r, block_c, warps in ((32, 256, 8), (64, 128, 8), (16, 512, 8), (64, 256, 16), (16, 128, 4)):
            for programs in (132, 264, 528, 0):
                plans.append(RowwisePlan("cols", block_r, block_c, warps, programs=programs))
            for chunk in (256, 512, 1024, 2048, 4096):
                if chunk < cols and chunk % block_c == 0:
                    plans.append(RowwisePlan("cols_split", block_r, block_c, warps, chunk=chunk))
    return list(dict.fromkeys(plans))  # the default first, once


def rowwise_quantisers(tokens: int, sweep: bool = True) -> dict:
    """The rowwise recipe's quantiser on each operand kind: the Triton kernel's default plan (and, with `sweep`,
    the alternatives of `candidate_plans`) against the same torch operations compiled by Inductor (the fused path).
    Median ms (L2 flushed between repetitions) and the GB/s of reading the input once and writing its FP8 values
    once (what a single pass moves; the transposed kernels read the input twice); `same` says whether q and the
    scales are bit-identical to `quantize_rowwise` on the GPU."""
    from hf_deepseek.modeling.fp8_numerics import quantize_rowwise
    from hf_deepseek.modeling.fp8_triton import quantize_rowwise_triton

    inductor = torch.compile(lambda t: [u.contiguous() for u in quantize_rowwise(t, check=False)])
    out = {}
    for name, t in quantiser_operands(tokens).items():
        gbytes = t.numel() * (t.element_size() + 1) / 1e9
        q_ref, s_ref = quantize_rowwise(t, check=False)
        timed = {f"triton {tuple(p)}": p for p in (candidate_plans(t) if sweep else candidate_plans(t)[:1])}
        timed["inductor"] = None
        rows = {}
        for kind, plan in timed.items():
            if plan is None:
                fn = lambda t=t: inductor(t)  # noqa: E731
            else:
                fn = lambda t=t, plan=plan: quantize_rowwise_triton(t, t.shape[-2], t.shape[-1], False, plan=plan)  # noqa: E731
            q, scale = fn()[:2]
            same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, s_ref)
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
            rows[kind] = {"ms": ms, "GB/s": gbytes / (ms / 1e3), "same": same}
            del q, scale
        out[name] = rows
    return out


def print_quantisers(results: dict) -> None:
    for name, rows in results.items():
        best = min((r for k, r in rows.items() if k != "inductor"), key=lambda r: r["ms"])
        print(f"{name}: best Triton {best['ms']:.3f} ms ({best['GB/s']:.0f} GB/s)")
        for kind, r in rows.items():
            print(f"    {kind:<58} {r['ms']:8.3f} ms {r['GB/s']:6.0f} GB/s {'same' if r['same'] else 'DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (M), e.g. 4 x 2048")
    parser.add_argument("--experts", type=int, default=32, help="routed experts on this GPU (an EP shard of 256)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quantisers-only", action="store_true", help="time only the rowwise quantisers (a sweep)")
    args = parser.parse_args()
    if args.quantisers_only:
        device = torch.cuda.get_device_name()
        print(f"{device}, torch {torch.__version__}; rowwise quantisers at {2 * args.tokens} tokens")
        big = torch.randn(64, 2816, 2048, device="cuda", dtype=torch.bfloat16)
        copy_ms = do_bench(lambda: torch.empty_like(big).copy_(big), warmup=10, rep=100, return_mode="median")
        copy_gbs = big.numel() * 4 / 1e9 / (copy_ms / 1e3)  # bytes read plus bytes written
        print(f"ceiling: a device-to-device copy of 738 MB, {copy_gbs:.0f} GB/s (read + written)")
        del big
        quantisers = rowwise_quantisers(2 * args.tokens)
        quantisers["copy ceiling GB/s"] = copy_gbs
        print_quantisers({k: v for k, v in quantisers.items() if isinstance(v, dict)})
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"device": device, "torch": torch.__version__, "tokens": args.tokens, "rowwise": quantisers}, f
                )
        return

    rows = [bench_linear(name, k, n, args.tokens) for name, k, n in LINEARS]
    total = {v: sum(r["ms"][v] for r in rows) for v in rows[0]["ms"]}
    rows.append({"layer": "all linear layers above", "ms": total, "tflops": {}})
    rows.append(bench_experts(args.tokens, args.experts, top_k=8))

    from hf_deepseek.modeling.fp8 import get_backend

    cublas = {f"{'1x128 x 128x128' if b else '1x128 x 1x128'} -> {d}": ok
              for (b, d), ok in get_backend(FP8Recipe(), torch.device("cuda")).cublas.items()}  # fmt: skip
    device = torch.cuda.get_device_name()
    print(f"torch._scaled_mm blockwise used: {cublas}")
    print(f"{device}, torch {torch.__version__}; forward+backward, median ms (speed-up over bf16)")
    for row in rows:
        cells = [f"{v} {ms:7.3f} ({row['ms']['bf16'] / ms:4.2f}x)" for v, ms in row["ms"].items()]
        print(f"{row['layer']:<34}" + " | ".join(cells))
    pieces = {
        "o_proj pieces": breakdown(args.tokens, 16384, 7168),
        "expert pieces": bench_grouped(args.tokens, args.experts, 8),
    }
    quantisers = rowwise_quantisers(2 * args.tokens, sweep=False)
    for title, part in pieces.items():
        cells = [
            f"{n} {v:.3f}" if isinstance(v, float) else f"{n} {v['ms']:.3f} ({v['GB/s']:.0f} GB/s)"
            for n, v in part.items()
        ]
        print(f"{title}: " + ", ".join(cells))
    print("rowwise quantisers (Triton default plan against Inductor):")
    print_quantisers(quantisers)
    if args.json:
        rows.append(dict(pieces, **{"rowwise quantisers": quantisers}))
        with open(args.json, "w") as f:
            json.dump(
                {"device": device, "torch": torch.__version__, "tokens": args.tokens, "cublas": cublas, "rows": rows}, f
            )


if __name__ == "__main__":
    main()
