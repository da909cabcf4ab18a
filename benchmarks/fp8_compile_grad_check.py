"""Compiled FP8 training against eager FP8, part by part (hf_deepseek/evals/fp8_compile_check.py): the routed
experts (with the bf16 grouped weight gradient as an opaque op, and inlined into Inductor's graph as it was
before), one linear layer and a whole small model, for both recipes. On a CUDA machine:

    python benchmarks/fp8_compile_grad_check.py --json out.json
"""

import argparse
import json
import time

import torch
import torch._inductor.config

from hf_deepseek.evals import fp8_compile_check as check
from hf_deepseek.modeling import fp8
from hf_deepseek.modeling.fp8 import FP8Recipe
from hf_deepseek.modeling.fp8_numerics import grouped_wgrad_high_precision


def inline_wgrad(dy, x, layout):
    """The weight gradient as it was traced before: torch's grouped GEMM called inside Inductor's graph."""
    return torch._grouped_mm(dy.t().to(torch.bfloat16).contiguous(), x.to(torch.bfloat16), offs=layout.seg_end)


scatter_apply = fp8.ScatterUniqueRows.apply


def plain_scatter(rows, pos, total):
    """ScatterUniqueRows through autograd's own indexing (index_put backward), for the bisection."""
    return rows.new_zeros(total, rows.shape[1]).index_put((pos,), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--recipes", default="rowwise,deepseek")
    parser.add_argument("--device", default="cuda", help="cuda (Hopper kernels) or cpu (the emulation)")
    parser.add_argument("--bisect", action="store_true", help="first localise the experts' input gradient")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model check (the slowest compile)")
    args = parser.parse_args()
    start, results = time.time(), {}

    def record(key, got, want):
        results[key] = diffs = check.relative_differences(got, want)
        print(f"{key}: worst {check.worst(diffs, 3)} ({time.time() - start:.0f} s)", flush=True)

    def attempt(key, fn, *args):
        """record(key, fn(*args)) where it runs; a variant that fails is reported and the bisection goes on."""
        try:
            record(key, *fn(*args))
        except Exception as exc:  # noqa: BLE001 -- one line per failed variant is the point
            results[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(f"{key}: {results[key]['error']}", flush=True)

    if args.bisect:  # the routed experts' input gradient: which compiler stage or which piece changes it
        rowwise, device = FP8Recipe.named("rowwise"), args.device

        def versus_eager(recipe, compile_it):
            return check.expert_gradients(recipe, compile_it, device), check.expert_gradients(recipe, False, device)

        attempt("bisect/bf16-experts", versus_eager, None, True)
        for backend in ("aot_eager", "aot_eager_decomp_partition"):
            attempt(f"bisect/{backend}", versus_eager, rowwise, backend)
        with torch._inductor.config.patch(pattern_matcher=False):
            attempt("bisect/inductor-no-pattern-matcher", versus_eager, rowwise, True)
        with torch._inductor.config.patch(reorder_for_locality=False, split_reductions=False):
            attempt("bisect/inductor-no-reorder", versus_eager, rowwise, True)
        with torch._inductor.config.patch(max_fusion_size=1):  # every node its own kernel: a fusion bug goes away
            attempt("bisect/inductor-no-fusion", versus_eager, rowwise, True)
        try:  # the padded-buffer scatter as plain autograd indexing instead of the custom Function
            fp8.ScatterUniqueRows.apply = staticmethod(plain_scatter)
            attempt("bisect/inductor-plain-scatter", versus_eager, rowwise, True)
        finally:
            fp8.ScatterUniqueRows.apply = scatter_apply
    for name in args.recipes.split(","):  # one recipe at a time, all its parts: a cut-off run still localises
        recipe = FP8Recipe.named(name)
        try:
            fp8.grouped_wgrad_high_precision = inline_wgrad
            record(
                f"experts-inline-wgrad/{name}",
                check.expert_gradients(recipe, True, args.device),
                check.expert_gradients(recipe, False, args.device),
            )
        finally:
            fp8.grouped_wgrad_high_precision = grouped_wgrad_high_precision
        record(
            f"experts/{name}",
            check.expert_gradients(recipe, True, args.device),
            check.expert_gradients(recipe, False, args.device),
        )
        record(
            f"linear/{name}",
            check.linear_gradients(recipe, True, args.device),
            check.linear_gradients(recipe, False, args.device),
        )
        if not args.no_model:
            record(
                f"model/{name}",
                check.model_gradients(recipe, True, args.device),
                check.model_gradients(recipe, False, args.device),
            )
        if args.json:  # after every recipe, so a run stopped by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    results["seconds"] = round(time.time() - start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
