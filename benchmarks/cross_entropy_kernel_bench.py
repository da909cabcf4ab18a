"""One chunk of the training loss (`modeling/output_loss.py`) at the bench's shape, 2048 rows of DeepSeek-V3's 129280
logits in bf16 (530 MB): Inductor's kernel of `_chunk_terms_over_logits` (`TRITON_LOSS = False`) against the Triton
kernel (`kernels/_cross_entropy_triton.py`) at a few (block, warps) choices, the first its default, and with a
persistent grid of 1 or 2 programs a multiprocessor (at most that many rows read at once). Each time is the
median over CUDA events of one call on fresh logits with L2 flushed; GB/s counts the bytes of two reads and one
write of the chunk (the least the two-pass kernel moves if its second read missed L2). Every target is a counted
one (an ignored row the kernel does not read). Also the largest gradient difference from Inductor's and the loss's
relative difference.

    python benchmarks/cross_entropy_kernel_bench.py [--rows 2048] [--vocab 129280] [--reps 20] [--json out.json]
"""

import argparse
import json
import statistics

import torch

from hf_deepseek.kernels._cross_entropy_triton import BLOCK, WARPS, cross_entropy_rows_in_place
from hf_deepseek.modeling.output_loss import _chunk_terms_over_logits, _on_cuda_compiled


def timed(fn, source: torch.Tensor, targets, scale, reps: int):
    """(median ms, loss, gradient) of fn on a fresh copy of `source` each call."""
    buffer, flush = torch.empty_like(source), torch.empty(256 << 20, dtype=torch.uint8, device=source.device)
    times = []
    for rep in range(reps + 3):
        buffer.copy_(source)
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(buffer, targets, scale)
        end.record()
        torch.cuda.synchronize()
        if rep >= 3:  # warm-up: compilation, autotuning
            times.append(start.elapsed_time(end))
    return statistics.median(times), loss.item(), buffer.float()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--configs",
        default=f"{BLOCK}x{WARPS},16384x16,8192x8,{BLOCK}x{WARPS}x1,{BLOCK}x{WARPS}x2",
        help="Triton (block)x(warps)[x(programs a multiprocessor): a persistent grid] list",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = (torch.randn(args.rows, args.vocab, device="cuda") * 2).bfloat16()
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    scale = torch.tensor(1.0 / args.rows, device="cuda")
    gigabytes = 3 * source.numel() * source.element_size() / 1e9
    ms, ref_loss, ref_grad = timed(lambda *a: _on_cuda_compiled(_chunk_terms_over_logits, *a), source, targets,
                                   scale, args.reps)  # fmt: skip
    rows = [{"kernel": "inductor", "ms": ms, "GB/s": gigabytes / ms * 1e3, "max_grad_diff": 0.0, "loss_rel_diff": 0.0}]
    for config in args.configs.split(","):
        block, warps, *per_sm = (int(v) for v in config.split("x"))
        programs = per_sm[0] * torch.cuda.get_device_properties(0).multi_processor_count if per_sm else None
        ms, loss, grad = timed(
            lambda *a, b=block, w=warps, p=programs: cross_entropy_rows_in_place(*a, block=b, warps=w, programs=p),
            source, targets, scale, args.reps,
        )  # fmt: skip
        rows.append({"kernel": f"triton {config}", "ms": ms, "GB/s": gigabytes / ms * 1e3,
                     "max_grad_diff": (grad - ref_grad).abs().max().item(),
                     "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss)})  # fmt: skip
    print(f"{args.rows} x {args.vocab} bf16 on {torch.cuda.get_device_name()}, {gigabytes:.2f} GB a call")
    print(f"{'kernel':<20} {'us':>8} {'GB/s':>8} {'max |dgrad|':>12} {'loss rel':>10}")
    for r in rows:
        print(f"{r['kernel']:<20} {r['ms'] * 1e3:8.1f} {r['GB/s']:8.0f} {r['max_grad_diff']:12.2e} "
              f"{r['loss_rel_diff']:10.1e}")  # fmt: skip
    if args.json:
        record = {"rows": args.rows, "vocab": args.vocab, "reps": args.reps, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "results": rows}  # fmt: skip
        with open(args.json, "w") as out:
            json.dump(record, out, indent=1)


if __name__ == "__main__":
    main()
