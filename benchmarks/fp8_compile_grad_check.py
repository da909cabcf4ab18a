"""Compiled FP8 training against eager FP8, part by part (hf_deepseek/evals/fp8_compile_check.py): the routed
experts, one linear layer and a whole small model, for both recipes; with --bisect, first the routed experts under
other compilers and Inductor settings, to place a difference. On a CUDA machine:

    python benchmarks/fp8_compile_grad_check.py [--bisect] [--json out.json]
"""

import argparse
import contextlib
import json
import time

import torch
import torch._inductor.config

from hf_deepseek.evals import fp8_compile_check as check
from hf_deepseek.modeling import fp8
from hf_deepseek.modeling.fp8 import FP8Recipe


def _inplace_scatter_forward(ctx, rows, pos, total):
    ctx.save_for_backward(pos)
    return rows.new_zeros(total, rows.shape[1]).index_copy_(0, pos, rows)


@contextlib.contextmanager
def inplace_scatter_in_experts():
    """ScatterUniqueRows as it was: its forward returned `index_copy_`'s in-place result, which torch 2.11's Dynamo
    cut from the autograd graph (the experts' input gradient then came out zero). Patching `apply` would not do:
    Dynamo traces an autograd.Function's own forward and backward whatever `apply` is."""
    original = fp8.ScatterUniqueRows.forward
    fp8.ScatterUniqueRows.forward = staticmethod(_inplace_scatter_forward)
    try:
        yield
    finally:
        fp8.ScatterUniqueRows.forward = original


# (name, compiler: True for Inductor with the FP8 options or a Dynamo backend's name, context to compile in)
BISECTION = [
    ("aot_eager", "aot_eager", contextlib.nullcontext),
    ("aot_eager_decomp_partition", "aot_eager_decomp_partition", contextlib.nullcontext),
    ("inductor-no-pattern-matcher", True, lambda: torch._inductor.config.patch(pattern_matcher=False)),
    ("inductor-no-reorder", True,
     lambda: torch._inductor.config.patch(reorder_for_locality=False, split_reductions=False)),
    ("inductor-no-fusion", True, lambda: torch._inductor.config.patch(max_fusion_size=1)),  # every node a kernel
    ("aot_eager-inplace-scatter", "aot_eager", inplace_scatter_in_experts),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--recipes", default="rowwise,deepseek")
    parser.add_argument("--device", default="cuda", help="cuda (Hopper kernels) or cpu (the emulation)")
    parser.add_argument("--bisect", action="store_true", help="first localise the experts' input gradient")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model check (the slowest compile)")
    args = parser.parse_args()
    start, results = time.time(), {}

    def report(key, differences):
        results[key] = differences
        print(f"{key}: worst {check.worst(differences, 3)} ({time.time() - start:.0f} s)", flush=True)
        if args.json:  # after every part, so a run stopped by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    def attempt(key, compiled, eager):
        """report(key, ...) where the variant runs; one that fails is reported and the bisection goes on."""
        try:
            report(key, check.relative_differences(compiled(), eager))
        except Exception as exc:  # noqa: BLE001 -- one line per failed variant is the point
            results[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(f"{key}: {results[key]['error']}", flush=True)

    if args.bisect:  # the routed experts' input gradient: which compiler stage or which piece changes it
        bf16_eager = check.expert_gradients(None, False, args.device)
        attempt("bisect/bf16-experts", lambda: check.expert_gradients(None, True, args.device), bf16_eager)
        rowwise = FP8Recipe.named("rowwise")
        eager = check.expert_gradients(rowwise, False, args.device)
        for name, compiler, context in BISECTION:
            with context():
                attempt(f"bisect/{name}", lambda c=compiler: check.expert_gradients(rowwise, c, args.device), eager)
    # one recipe at a time, all its parts: a cut-off run still localises
    check.check_all(args.recipes.split(","), args.device, with_model=not args.no_model, report=report)
    results["seconds"] = round(time.time() - start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
