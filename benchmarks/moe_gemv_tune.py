"""Time the routed experts' matrix-vector kernels (`hf_deepseek/kernels/moe_gemv.py`) at the decode bench's expert
shapes for several block configurations, against torch's grouped GEMM on the same routing; the chosen experts'
bytes over the time give the bandwidth each reaches. On a CUDA machine with Triton:

    python benchmarks/moe_gemv_tune.py [--json out.json]
"""

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from hf_deepseek.modeling.moe import count_per_expert

CONFIGS = [(n, k, w) for n, k, w in itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8)) if n * k <= 16384]


def time_us(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    graph = torch.cuda.CUDAGraph()  # replayed, as the decode step runs it: no launch overhead in the figure
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats // 20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / repeats


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


def main() -> None:
    from hf_deepseek.kernels import _moe_gemv_triton, moe_gemv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    experts, dim, inter, top_k = 64, 2048, 1408, 6
    gate_up = torch.randn(experts, 2 * inter, dim, device="cuda", dtype=torch.bfloat16) * dim**-0.5
    down = torch.randn(experts, dim, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    results = {"shape": dict(experts=experts, dim=dim, inter=inter, top_k=top_k), "rows": []}
    for tokens in (1, 4):
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        indices = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, device="cuda").softmax(-1)
        distinct = indices.unique().numel()
        nbytes = distinct * 3 * inter * dim * 2
        want = moe_gemv.reference(x, indices, weights, gate_up, down).float()
        with torch.no_grad():
            inputs = (x, indices, weights, gate_up, down)
            base = time_us(lambda args=inputs: grouped(*args))
            results["rows"].append(dict(tokens=tokens, kernel="torch grouped_mm", us=base, tb_s=nbytes / base / 1e6))
            print(f"tokens {tokens}: grouped_mm {base:.1f} us ({nbytes / base / 1e6:.2f} TB/s)", flush=True)
            for config in CONFIGS:
                try:
                    out = _moe_gemv_triton.launch(x, indices, weights, gate_up, down, config).float()
                    error = ((out - want).norm() / want.norm()).item()
                    us = time_us(lambda c=config, args=inputs: _moe_gemv_triton.launch(*args, c))
                except Exception as exc:  # a configuration Triton cannot compile is reported and skipped
                    print(f"  {config}: failed {type(exc).__name__}", flush=True)
                    continue
                results["rows"].append(
                    dict(tokens=tokens, kernel="triton gemv", config=config, us=us, tb_s=nbytes / us / 1e6, error=error)
                )
                print(f"  {config}: {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s) error {error:.1e}", flush=True)
    best = {t: min((r for r in results["rows"] if r["tokens"] == t and "config" in r), key=lambda r: r["us"])
            for t in (1, 4)}  # fmt: skip
    results["best"] = {str(t): r for t, r in best.items()}
    print("best:", {t: (r["config"], round(r["us"], 1)) for t, r in best.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
