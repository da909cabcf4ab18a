"""AdamW's step alone at the training bench's parameter shapes, in the ways torch can run it: the fused kernel (what
`hf-deepseek bench train` and the trainers use on CUDA), the foreach kernels, the foreach step compiled by Inductor,
the fused kernel over one flat buffer (every parameter and gradient a view into one tensor each, so the step is
one long tensor instead of ~400); and the project's `kernels.adamw.TritonAdamW` (one Triton kernel per parameter).
Bytes moved a step: parameters, gradients and both moments read, parameters and both moments written; GB/s against
a device-to-device copy's in the same run. The profiled FP8 and bf16 bench steps spend ~26 ms in AdamW's fused
kernel (2026-12-04g), about 2.5 TB/s for the bf16 weights and moments of 4.72B parameters: this measures what the
other ways reach.

    python benchmarks/adamw_bench.py [--device cuda] [--shape bench|v3-width] [--steps 10] [--json out.json]
    python benchmarks/adamw_bench.py --device cpu --tiny          # CPU smoke test
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.evals.bench import synchronize
from hf_deepseek.evals.bench_decode import copy_bandwidth
from hf_deepseek.evals.bench_train import SHAPES, TINY_TRAIN_PLAN
from hf_deepseek.kernels.adamw import TritonAdamW

VARIANTS = ("fused", "triton", "foreach", "foreach-compiled", "fused-flat")


def parameter_shapes(config: dict) -> list[torch.Size]:
    """The shapes of the bench model's parameters (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = DeepSeekForCausalLM._from_config(DeepSeekConfig(**config))
    return [p.shape for p in model.parameters()]


def make_parameters(shapes, device, dtype, flat: bool):
    """(parameters with random gradients, the flat (data, gradient) buffers or None): with `flat`, every parameter
    and gradient is a view into one buffer each."""
    if not flat:
        params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return params, None
    total = sum(s.numel() for s in shapes)
    data = torch.randn(total, device=device, dtype=dtype) * 0.02
    grads = torch.randn(total, device=device, dtype=dtype) * 1e-3
    params, offset = [], 0
    for s in shapes:
        p = torch.nn.Parameter(data[offset : offset + s.numel()].view(s))
        p.grad = grads[offset : offset + s.numel()].view(s)
        params.append(p)
        offset += s.numel()
    return params, (data, grads)


def step_function(variant: str, params, buffers, device):
    """The optimizer step to time for `variant` (fused-flat: one fused AdamW over the flat buffers, which update
    every parameter's view at once)."""
    cuda = device.type == "cuda"
    if variant == "fused-flat":
        flat = torch.nn.Parameter(buffers[0])
        flat.grad = buffers[1]
        return torch.optim.AdamW([flat], lr=1e-4, fused=cuda).step
    if variant == "fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=cuda).step
    if variant == "triton":
        return TritonAdamW(params, lr=1e-4).step
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return torch.compile(optimizer.step) if variant == "foreach-compiled" else optimizer.step


def time_variant(variant: str, shapes, device, dtype, steps: int) -> float:
    params, buffers = make_parameters(shapes, device, dtype, flat=variant == "fused-flat")
    step = step_function(variant, params, buffers, device)
    for _ in range(3):  # state allocation, compilation
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    del params, buffers, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="bench", help="`bench train`'s shapes")
    parser.add_argument("--tiny", action="store_true", help="the CPU smoke test's config")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = parameter_shapes((TINY_TRAIN_PLAN if args.tiny else SHAPES[args.shape]).config)
    count = sum(s.numel() for s in shapes)
    element = torch.empty((), dtype=dtype).element_size()
    moved = count * element * 7  # read: parameter, gradient, two moments; written: parameter, two moments
    bandwidth = copy_bandwidth(device)
    print(f"{len(shapes)} parameters, {count / 1e9:.3f}B values, {dtype}; {moved / 1e9:.1f} GB a step", flush=True)
    results = {}
    for variant in args.variants.split(","):
        ms = time_variant(variant, shapes, device, dtype, args.steps)
        rate = moved / ms / 1e6
        results[variant] = {"ms": ms, "gb_s": rate, "of_copy": rate * 1e9 / bandwidth if bandwidth else None}
        against = f", {100 * results[variant]['of_copy']:.0f}% of copy" if bandwidth else ""
        print(f"{variant}: {ms:.2f} ms, {rate:.0f} GB/s{against}", flush=True)
    if args.json:
        summary = {"device": str(device), "torch": torch.__version__, "shape": "tiny" if args.tiny else args.shape,
                   "parameters": count, "dtype": str(dtype), "bytes_a_step": moved, "copy_bandwidth": bandwidth,
                   "steps": args.steps, "results": results}  # fmt: skip
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
