"""Where the routed experts' whole FP8 MLP in one function (`FP8Recipe.fused_moe_quantization`) and the layer-by-layer
path part, compiled: one forward and backward of the same model from the same weights and batch, and each
parameter's gradient of the fused step against the layer-by-layer step's and both against bf16's.

    python benchmarks/fused_moe_gradients.py --recipe rowwise --json rowwise.json       # on a GPU: the bench's layers
    python benchmarks/fused_moe_gradients.py --device cpu --shape tiny --recipe deepseek  # CPU smoke test

A gradient the fused function gets wrong (missing, scaled, a row misplaced) shows here as a parameter whose fused
gradient is much further from the layer-by-layer one than FP8's own rounding puts it from bf16's (a few percent).
It found the routed experts' and routers' gradients zero under torch 2.11's Dynamo (docs/PERF.md, 2026-12-07):
the CPU checks, on torch 2.13, could not see it. Prints each run's loss and the parameters sorted by that distance,
and with --json writes every parameter's figures.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_train_compare import recipe_from_spec  # noqa: E402

from hf_deepseek import DeepSeekConfig  # noqa: E402
from hf_deepseek.evals.bench import FULL_CONFIG  # noqa: E402
from hf_deepseek.evals.bench_train import TINY_TRAIN_PLAN, TrainBenchPlan, training_batches  # noqa: E402
from hf_deepseek.evals.fp8_compile_check import relative_differences  # noqa: E402
from hf_deepseek.modeling import DeepSeekForCausalLM  # noqa: E402
from hf_deepseek.modeling.compile_regions import compile_for_training  # noqa: E402
from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training  # noqa: E402
from hf_deepseek.modeling.output_loss import enable_fused_output_loss  # noqa: E402

# the bench's layers (one dense, then MoE layers of 64 experts top-6), fewer of them: each compiles once either way
SHAPES = {
    "bench": (TrainBenchPlan({**FULL_CONFIG, "num_nextn_predict_layers": 0, "num_hidden_layers": 3}), 4, 2048),
    "tiny": (TINY_TRAIN_PLAN, 2, 32),
}


def gradients(plan, device, recipe: FP8Recipe | None, compiled: bool, batch: torch.Tensor):
    """(loss, {parameter name: gradient on the host}) of one forward and backward from the seed-0 weights."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepSeekForCausalLM._from_config(DeepSeekConfig(**plan.config), dtype=torch.bfloat16).train()
    enable_fused_output_loss(model, 8)
    if recipe is not None:
        convert_to_fp8_training(model, recipe)
    if compiled:
        compile_for_training(model)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="rowwise", help="a named recipe and fields: rowwise+linear_wgrad=bf16")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eager", action="store_true", help="do not compile (the CPU's path: equal gradients)")
    parser.add_argument("--top", type=int, default=25, help="parameters printed, furthest first")
    parser.add_argument("--json")
    args = parser.parse_args()
    recipe = recipe_from_spec(args.recipe)
    if args.device == "cpu":
        recipe = dataclasses.replace(recipe, backend="emulated")
    fused = dataclasses.replace(recipe, fused_moe_quantization=True)
    layer_by_layer = dataclasses.replace(recipe, fused_moe_quantization=False)
    plan, batch_size, seq_len = SHAPES[args.shape]
    plan = TrainBenchPlan(**{**plan.__dict__, "batch_size": batch_size, "seq_len": seq_len})
    device = torch.device(args.device)
    batch = training_batches(plan, plan.config["vocab_size"], 1, device)[0]
    runs = {}
    for label, recipe in (("bf16", None), ("fused", fused), ("layer by layer", layer_by_layer)):
        start = time.perf_counter()
        runs[label] = gradients(plan, device, recipe, not args.eager, batch)
        print(f"{label}: loss {runs[label][0]:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    (_, bf16), (_, got), (_, want) = runs["bf16"], runs["fused"], runs["layer by layer"]
    missing = sorted(set(want) ^ set(got))
    common = sorted(want.keys() & got.keys())
    got, want, bf16 = ({n: grads[n] for n in common} for grads in (got, want, bf16))
    fused_lbl, fused_bf16, lbl_bf16 = (relative_differences(*pair) for pair in ((got, want), (got, bf16), (want, bf16)))
    rows = [{
        "parameter": n,
        "fused vs layer by layer": fused_lbl[n],
        "fused vs bf16": fused_bf16[n],
        "layer by layer vs bf16": lbl_bf16[n],
        "norm ratio fused / layer by layer": float(got[n].norm() / want[n].norm().clamp_min(1e-30)),
    } for n in common]  # fmt: skip
    rows.sort(key=lambda r: r["fused vs layer by layer"] / max(r["layer by layer vs bf16"], 1e-6), reverse=True)
    print(f"{'parameter':<58} fused~lbl fused~bf16 lbl~bf16 |fused|/|lbl|")
    for r in rows[: args.top]:
        print(f"{r['parameter'][:58]:<58} {r['fused vs layer by layer']:9.2e} {r['fused vs bf16']:9.2e} "
              f"{r['layer by layer vs bf16']:8.2e} {r['norm ratio fused / layer by layer']:12.4f}")  # fmt: skip
    if missing:
        print(f"gradients in one run only: {missing}")
    if args.json:
        record = {"command": "python " + " ".join(sys.argv), "losses": {k: v[0] for k, v in runs.items()},
                  "compiled": not args.eager, "missing": missing, "parameters": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
