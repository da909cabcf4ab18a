"""The routed experts' training GEMMs at the training bench's shapes (16,384 tokens, top-6 of 64 experts, hidden 2048,
expert width 1408) or, with `--shape v3-width`, at its DeepSeek-V3-width model's (8,192 tokens, top-8 of 64 experts,
hidden 7168, expert width 2048), each candidate kernel timed alone on the same operands, for issue 16's choice of the
FP8 grouped GEMMs (the issue asks each of forward, input gradient and weight gradient at 1.3x torch's bf16
`_grouped_mm`):

- every product x [M, K] W[e]^T over the experts' 128-aligned row segments (gate/up and down forward, their input
  gradients through W^T): torch's bf16 `_grouped_mm` (the bf16 step's kernel), torch's FP8 rowwise
  `_scaled_grouped_mm` (the FP8 step's), and, where the optional `fbgemm-gpu-genai` wheel imports, FBGEMM's CUTLASS
  kernels: FP8 rowwise `f8f8bf16_rowwise_grouped_stacked`, FP8 DeepSeek-style groupwise (1x128 activation tiles,
  128x128 weight blocks) `f8f8bf16_groupwise_grouped` and bf16 `bf16bf16bf16_grouped_stacked`;
- the weight gradients dW[e] = dy[rows of e]^T x[rows of e]: torch's bf16 `_grouped_mm` over the token dimension
  (dy^T as a transposed view, as torch's autograd passes it and the FP8 step does since 2026-12-06, and with the
  transposed copy of dy the step made before), FBGEMM's bf16 `bf16bf16bf16_grouped_wgrad`, and torch's FP8
  `_scaled_grouped_mm` over two 2-D operands split along the tokens, each scaled per (expert, column) (torchao's
  rowwise MoE recipe), with cuBLAS's fast accumulation and with promoted sums;
- where the optional `sgl-deep-gemm` wheel imports (DeepSeek's DeepGEMM as SGLang publishes it; it compiles its
  kernels with the machine's nvcc on first use): its blockwise FP8 grouped GEMMs over the contiguous layout, the
  forward (`m_grouped_fp8_gemm_nt_contiguous`) and the input gradient straight from the forward's 128x128 weight
  blocks (`m_grouped_fp8_gemm_nn_contiguous`: W^T needs no quantisation of its own, the paper's reason for blocks).

Each row: median ms (`triton.testing.do_bench`), TFLOP/s and the relative error (Frobenius) against the float32
product of the bf16 operands (FP8's rounding included). Quantisation is not timed in these rows (the step's
quantisers are measured by `fp8_quant_census.py`), except the FP8 weight gradient's: the recipe's Triton kernels
quantising both of its operands get a line of their own.

    python benchmarks/grouped_gemm_candidates.py --json grouped_gemm_candidates.json
    python benchmarks/grouped_gemm_candidates.py --shape v3-width --json grouped_gemm_candidates_v3_width.json

Needs a CUDA GPU of compute capability 9.0. On the device image install the FBGEMM wheel without its dependencies
(`pip install --no-deps --target /tmp/site fbgemm_gpu_genai-1.6.0-*.whl`, the release built for torch 2.11 and CUDA
13; PYTHONPATH=/tmp/site:$PWD).
"""

import argparse
import json
from functools import partial

import torch

# (tokens, top-k, experts, hidden, expert width): the training bench's shapes, and `--shape v3-width`'s (the bench's
# DeepSeek-V3-width model: batch 4 x 2048, top-8 of 64 experts of width 2048, hidden 7168)
SHAPES = {"bench": (16384, 6, 64, 2048, 1408), "v3-width": (8192, 8, 64, 7168, 2048)}
ALIGN = 128  # the FP8 step's segment alignment (`fp8_numerics.expert_layout`)


def products(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    """y[M, N] = x[M, K] W[e][N, K]^T per expert: name -> (K, N)."""
    return {
        "gate_up forward": (hidden, 2 * inter),
        "down forward": (inter, hidden),
        "gate_up input grad": (2 * inter, hidden),
        "down input grad": (hidden, inter),
    }


def weight_grads(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    """dW[e][N, K] = dy[rows of e]^T x[rows of e]: name -> (N, K)."""
    return {"gate_up weight grad": (2 * inter, hidden), "down weight grad": (hidden, inter)}


def segment_sizes(tokens: int, top_k: int, experts: int, align: int = ALIGN, seed: int = 0) -> list[int]:
    """Rows per expert of a uniform random top-k routing, each rounded up to `align` (the FP8 step's layout)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(chosen, minlength=experts)
    return [-(-int(c) // align) * align for c in counts]


def block_experts(sizes: list[int], device=None) -> torch.Tensor:
    """The expert of each 128-row block of the segments (an `ExpertLayout`'s `block_expert`), int32."""
    counts = torch.tensor(sizes, device=device) // ALIGN
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts).int()


def product_flops(sizes: list[int], k: int, n: int) -> int:
    return 2 * sum(sizes) * k * n


def reference_products(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """x [M, K] (rows by segment) @ w[e]^T per segment, in float32."""
    return torch.cat([xs.float() @ we.float().t() for xs, we in zip(x.split(sizes), w, strict=True)])


def reference_weight_grads(dy: torch.Tensor, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """dy[rows of e]^T x[rows of e] per segment, float32 [E, N, K]."""
    parts = zip(dy.split(sizes), x.split(sizes), strict=True)
    return torch.stack([d.float().t() @ xs.float() for d, xs in parts])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One float32 scale per row of the last dimension (amax / 448), E4M3 values."""
    amax = t.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (t.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(-1)


def transposed_copy(product) -> torch.Tensor:
    """product()'s last two dimensions swapped, contiguous."""
    return product().transpose(-2, -1).contiguous()


def fbgemm_ops():
    """torch.ops.fbgemm with FBGEMM's gen_ai kernels and its quantisers, or (None, reason)."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers the kernels)
        from fbgemm_gpu.experimental.gemm.triton_gemm import fp8_gemm

        return (torch.ops.fbgemm, fp8_gemm), None
    except Exception as exc:  # an optional wheel: any failure to import is a row saying why
        return None, f"{type(exc).__name__}: {exc}"


def deep_gemm_module():
    """The `deep_gemm` module of the optional sgl-deep-gemm wheel, or (None, reason)."""
    try:
        import deep_gemm

        return deep_gemm, None
    except Exception as exc:  # an optional wheel: any failure to import is a row saying why
        return None, f"{type(exc).__name__}: {exc}"


def deep_gemm_candidates(x, w, sizes, deep_gemm, forward: bool) -> dict:
    """DeepGEMM's product over the segments: forward x W[e]^T (nt), or, for an input gradient, x W[e] from W's own
    blocks (nn): here `w` is [E, K, N], the layer's weight whose blocks the forward quantised."""
    from hf_deepseek.modeling.fp8_numerics import quantize_blocks, quantize_tiles

    m_indices = torch.repeat_interleave(
        torch.arange(len(sizes), device=x.device, dtype=torch.int32), torch.tensor(sizes, device=x.device)
    )
    # the operands as the blockwise recipe makes them: 1x128 tiles (scales column-major) and 128x128 weight blocks
    x_q, x_s = quantize_tiles(x)
    a, b = (x_q, x_s.t().contiguous().t()), quantize_blocks(w)
    out = torch.empty(x.shape[0], w.shape[1] if forward else w.shape[2], device=x.device, dtype=torch.bfloat16)
    op = "nt" if forward else "nn"
    fn = getattr(deep_gemm, f"m_grouped_fp8_gemm_{op}_contiguous")
    bf16_fn = getattr(deep_gemm, f"m_grouped_bf16_gemm_{op}_contiguous", None)

    def run():
        fn(a, b, out, m_indices)
        return out

    def run_bf16():
        bf16_fn(x, w, out, m_indices)
        return out

    found = {f"DeepGEMM FP8 blockwise m_grouped {op}" + ("" if forward else " (W's forward blocks)"): run}
    if bf16_fn is not None:  # a bf16 lever: DeepGEMM's grouped kernel against torch's _grouped_mm
        found[f"DeepGEMM bf16 m_grouped {op}"] = run_bf16
    return found


def deep_gemm_weight_grad(dy, x, sizes, deep_gemm) -> dict:
    """DeepGEMM's K-grouped bf16 weight gradient dy_e^T x_e, where the build has it: it accumulates into a float32
    C (here the output itself, zeroed in the timed call, as a step without float32 gradient buffers must)."""
    fn = getattr(deep_gemm, "k_grouped_bf16_gemm_tn_contiguous", None)
    if fn is None:
        return {}
    ks = torch.tensor(sizes, device=x.device, dtype=torch.int32)
    out = torch.empty(len(sizes), dy.shape[1], x.shape[1], device=x.device, dtype=torch.float32)

    def run():
        out.zero_()
        fn(dy, x, out, sizes, ks, c=out)
        return out

    return {"DeepGEMM bf16 k_grouped tn (float32 out, zeroed)": run}


def product_candidates(x, w, sizes, fbgemm) -> dict:
    """name -> a function computing x W[e]^T over the segments (operands prepared outside the timed call)."""
    offs = torch.tensor(sizes, device=x.device).cumsum(0).to(torch.int32)
    m_sizes = torch.tensor(sizes, device=x.device, dtype=torch.int64)
    w_t = w.transpose(-2, -1)
    xq, xs = rowwise_fp8(x)
    wq, ws = rowwise_fp8(w)  # [E, N, K], scales [E, N]
    wq_t = wq.transpose(-2, -1)
    found = {
        "torch bf16 _grouped_mm": lambda: torch._grouped_mm(x, w_t, offs=offs),
        "torch FP8 rowwise _scaled_grouped_mm": lambda: torch._scaled_grouped_mm(
            xq, wq_t, xs, ws, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True
        ),
    }
    if fbgemm is not None:
        ops, quant = fbgemm
        found["fbgemm FP8 rowwise grouped_stacked"] = lambda: ops.f8f8bf16_rowwise_grouped_stacked(
            xq, wq, xs, ws, m_sizes
        )
        found["fbgemm bf16 grouped_stacked"] = lambda: ops.bf16bf16bf16_grouped_stacked(x, w, m_sizes)
        try:
            xg, xgs = quant.quantize_fp8_group(x, m_sizes=m_sizes)
            blocks = [quant.quantize_fp8_block(we, block_m=128, block_k=128, k_major=False) for we in w]
            wb, wbs = (torch.stack(t).contiguous() for t in zip(*blocks, strict=True))
            found["fbgemm FP8 groupwise (1x128, 128x128) grouped"] = lambda: ops.f8f8bf16_groupwise_grouped(
                xg, wb, xgs, wbs, m_sizes
            )
        except Exception as exc:
            found["fbgemm FP8 groupwise (1x128, 128x128) grouped"] = f"{type(exc).__name__}: {exc}"
    return found


def weight_grad_candidates(dy, x, sizes, fbgemm) -> dict:
    offs = torch.tensor(sizes, device=x.device).cumsum(0).to(torch.int32)
    found = {
        "torch bf16 _grouped_mm (dy^T a transposed view)": lambda: torch._grouped_mm(dy.t(), x, offs=offs),
        "torch bf16 _grouped_mm (with dy^T copied)": lambda: torch._grouped_mm(dy.t().contiguous(), x, offs=offs),
    }
    # FP8 with one scale per (expert, column) along the tokens (torchao's rowwise MoE recipe, torchtitan's FP8 step, the
    # rowwise recipe's `grouped_wgrad="fp8"`): torch's grouped GEMM over two 2-D operands split along K (CUDA only;
    # the operands quantised by the recipe's reference, untimed here: `time_segment_columns` times its kernels)
    from hf_deepseek.modeling.fp8_numerics import quantize_segment_columns

    blocks = block_experts(sizes, dy.device)
    dyt_q, dy_s = quantize_segment_columns(dy, blocks, len(sizes), check=False)  # [N, R], [E, N]
    xt_q, x_s = quantize_segment_columns(x, blocks, len(sizes), check=False)  # [K, R], [E, K]
    for fast in (True, False):
        name = "torch FP8 rowwise _scaled_grouped_mm, per-expert column scales" + ("" if fast else ", promoted sums")
        found[name] = partial(
            torch._scaled_grouped_mm, dyt_q, xt_q.t(), dy_s.reshape(-1), x_s.reshape(-1), offs=offs,
            out_dtype=torch.bfloat16, use_fast_accum=fast,
        )  # fmt: skip
    # the same product in the other orientation, (x^T dy)^T, made contiguous as a weight's gradient must be: the
    # kernel's tiles fall differently where N and K differ (the down projection's: hidden x expert width)
    swapped = partial(
        torch._scaled_grouped_mm, xt_q, dyt_q.t(), x_s.reshape(-1), dy_s.reshape(-1), offs=offs,
        out_dtype=torch.bfloat16, use_fast_accum=True,
    )  # fmt: skip
    found["torch FP8 rowwise _scaled_grouped_mm, per-expert column scales, as (x^T dy)^T"] = partial(
        transposed_copy, swapped
    )
    if fbgemm is not None:
        ops, _ = fbgemm
        k_sizes = torch.tensor(sizes, device=x.device, dtype=torch.int64)
        found["fbgemm bf16 grouped_wgrad"] = lambda: ops.bf16bf16bf16_grouped_wgrad(dy, x, k_sizes)
    return found


def time_segment_columns(dy: torch.Tensor, x: torch.Tensor, sizes: list[int]) -> dict:
    """The rowwise recipe's FP8 weight-gradient operands as its step makes them (`quantize_segment_columns_triton`
    of dy and of x over the segments' 128-row blocks): median ms of both, and the bytes moved over that time."""
    from triton.testing import do_bench

    from hf_deepseek.modeling.fp8_triton import quantize_segment_columns_triton

    block_expert = block_experts(sizes, dy.device)

    def run():
        for t in (dy, x):
            quantize_segment_columns_triton(t, block_expert, len(sizes), pow2=False, fast=True)

    ms = do_bench(run, warmup=10, rep=100, return_mode="median")
    moved = sum(t.numel() * (2 * t.element_size() + 1) for t in (dy, x))
    return {"ms": ms, "gb_per_s": moved / ms / 1e6}


def measure(candidates: dict, want: torch.Tensor, flops: int) -> dict:
    from triton.testing import do_bench

    rows = {}
    for name, fn in candidates.items():
        if isinstance(fn, str):
            rows[name] = {"error": fn}
            continue
        try:
            err = relative_error(fn(), want)
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
        except Exception as exc:  # a kernel that does not take these shapes: its row says why
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        rows[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err": err}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--shape", choices=SHAPES, default="bench", help="the training bench's expert shapes or V3's")
    parser.add_argument("--tokens", type=int, help="tokens routed (default: the shape's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    tokens, top_k, experts, hidden, inter = SHAPES[args.shape]
    sizes = segment_sizes(args.tokens or tokens, top_k, experts)
    rows_total, dev = sum(sizes), "cuda"
    fbgemm, why = fbgemm_ops()
    deep_gemm, deep_gemm_why = deep_gemm_module()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": args.shape,
        "rows": rows_total,
        "experts": experts,
        "hidden": hidden,
        "expert_width": inter,
        "fbgemm": why or "imported",
        "deep_gemm": deep_gemm_why or "imported",
        "gemms": {},
        "quantisers": {},
    }
    print(f"{results['device']}, torch {torch.__version__}, {rows_total} rows over {experts} experts, fbgemm: "
          f"{results['fbgemm']}, deep_gemm: {results['deep_gemm']}")  # fmt: skip
    for name, (k, n) in products(hidden, inter).items():
        x = torch.randn(rows_total, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(experts, n, k, device=dev, dtype=torch.bfloat16) * k**-0.5
        want = reference_products(x, w, sizes)
        found = product_candidates(x, w, sizes, fbgemm)
        if deep_gemm is not None:
            # an input gradient's W[e]^T [N, K] is the transpose of the layer's weight [E, K, N] (`forward` False)
            forward = name.endswith("forward")
            layer_weight = w if forward else w.transpose(-2, -1).contiguous()
            found.update(deep_gemm_candidates(x, layer_weight, sizes, deep_gemm, forward))
        results["gemms"][name] = measure(found, want, product_flops(sizes, k, n))
    for name, (n, k) in weight_grads(hidden, inter).items():
        dy = torch.randn(rows_total, n, device=dev, dtype=torch.bfloat16)
        x = torch.randn(rows_total, k, device=dev, dtype=torch.bfloat16)
        want = reference_weight_grads(dy, x, sizes)
        found = weight_grad_candidates(dy, x, sizes, fbgemm)
        if deep_gemm is not None:
            found.update(deep_gemm_weight_grad(dy, x, sizes, deep_gemm))
        results["gemms"][name] = measure(found, want, product_flops(sizes, k, n))
        results["quantisers"][name] = time_segment_columns(dy, x, sizes)
    for gemm, rows in results["gemms"].items():
        print(f"\n{gemm}")
        for name, row in rows.items():
            if "error" in row:
                print(f"  {name:50s} unavailable: {row['error']}")
            else:
                print(f"  {name:50s} {row['ms']:8.3f} ms  {row['tflops']:7.1f} TFLOP/s  rel err {row['rel_err']:.2e}")
    for gemm, row in results["quantisers"].items():
        print(f"\n{gemm}: its FP8 operands (dy and x per expert and column) quantised by the step's Triton kernels: "
              f"{row['ms']:.3f} ms, {row['gb_per_s']:.0f} GB/s (bf16 read twice, E4M3 written once)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
