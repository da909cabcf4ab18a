"""AdamW's update writing the weight's FP8 copy (`modeling/fp8_adamw_triton.py`, `FP8Recipe.cache_weights`) against
the plain Triton update followed by the Hopper quantiser of the new weight (what a step without copies does: the
forward quantises each weight once the optimizer has written it), at the training bench's weight shapes; for the
experts' batched weights also without the columns' amaxes, and with other numbers of rows a program loops over
(each program merges its columns' amaxes with one atomic max a column). `--recipe deepseek`: the blockwise copy (W's
128x128 blocks and W^T's, written a block a program) against the update, W's blocks and their transposition (what
the forward and the backward of a step without copies do). Medians of `triton.testing.do_bench` in milliseconds,
and GB/s of the bytes the fused kernel moves (weight, gradient and moments read, weight and moments written, the
FP8 copy written: once rowwise, twice blockwise).

    python benchmarks/adamw_fp8_bench.py [--recipe deepseek] [--json out.json]       # CUDA
"""

import argparse
import json

import torch
import triton

from hf_deepseek.kernels._adamw_triton import adamw_update
from hf_deepseek.modeling.fp8 import FP8Recipe, get_backend
from hf_deepseek.modeling.fp8_adamw_triton import adamw_update_fp8
from hf_deepseek.modeling.fp8_weight_cache import FP8WeightCopy

SHAPES = {"experts gate_up": (64, 2816, 2048), "experts down": (64, 2048, 1408), "q_a": (1536, 2048),
          "shared gate": (2816, 2048), "kv_b": (4096, 512)}  # fmt: skip
HYPER = (1e-5, 0.9, 0.95, 1e-8, 1e-4, 0.5)


def time_shape(shape, backend, rows_list) -> dict[str, float]:
    """Milliseconds of each way at one weight shape."""
    p = torch.randn(shape, device="cuda").bfloat16()
    g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    copy = FP8WeightCopy()
    copy.fill(backend, p)
    row = {"plain update": triton.testing.do_bench(lambda: adamw_update(p, g, m, v, *HYPER))}
    if backend.rowwise:
        row["plain update + quantiser"] = triton.testing.do_bench(
            lambda: (adamw_update(p, g, m, v, *HYPER), backend.quantize_weight_and_amax_t(p))
        )
    else:  # W's blocks (the forward), then W^T's (the backward; eager, from W again: a compiled step transposes W's)
        row["plain update + quantiser"] = triton.testing.do_bench(
            lambda: (adamw_update(p, g, m, v, *HYPER), backend.quantize_weight_t(p, *backend.quantize_weight(p)))
        )
    row["fused (default)"] = triton.testing.do_bench(lambda: adamw_update_fp8(p, g, m, v, *HYPER, copy))
    if copy.amax_t is not None:  # the same update and rows without the columns' amaxes (whole rows, no loop)
        rows_only = FP8WeightCopy(copy.q, copy.scale, amax_t=None, pow2=copy.pow2)
        row["fused, no column amaxes"] = triton.testing.do_bench(
            lambda: adamw_update_fp8(p, g, m, v, *HYPER, rows_only)
        )
    for rows in rows_list if copy.amax_t is not None else ():
        row[f"fused, {rows} rows a program"] = triton.testing.do_bench(
            lambda rows=rows: adamw_update_fp8(p, g, m, v, *HYPER, copy, rows_a_program=rows)
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--rows", default="8,16,32,64,256", help="rows a program for the experts' weights")
    parser.add_argument("--recipe", choices=("rowwise", "deepseek"), default="rowwise")
    args = parser.parse_args()
    backend = get_backend(FP8Recipe.named(args.recipe), torch.device("cuda"))
    results = {}
    for name, shape in SHAPES.items():
        row = time_shape(shape, backend, [int(r) for r in args.rows.split(",")])
        gb = torch.Size(shape).numel() * (8 + 6 + (1 if backend.rowwise else 2)) / 1e9
        results[name] = {"shape": list(shape), "ms": row, "fused GB/s": gb / row["fused (default)"] * 1e3}
        print(name, shape, " ".join(f"{k}: {t:.3f}" for k, t in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            command = f"python benchmarks/adamw_fp8_bench.py --recipe {args.recipe}"
            json.dump({"command": command, "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
