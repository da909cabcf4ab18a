"""The kernels of the compiled batch-1 decode step, counted on the CPU: which launches a step makes and which
elementwise work Inductor fuses between them, without a GPU.

The GPU path's custom ops (the dense layers' matrix-vector kernel, the fused router, the experts' kernels, the
Triton decode attention, and with the kernel switches of the `bench decode` rows in `VARIANTS` the per-head
W_UK / W_UV kernel, MLP gate+up and q_a+kv_a in one launch, the q_a norm in q_b's launch) are forced on and run
their torch paths, so the traced graph holds the same op nodes as on an H200 and Inductor's CPU backend decides
the fusions between them (its scheduler fuses as the GPU backend does, not necessarily identically). Prints, per
variant, the Inductor kernels and the op calls of one step of a small DeepSeek-V3 (3 layers: one dense, two MoE):

    python benchmarks/decode_kernel_census.py [--json census.json]
"""

import argparse
import contextlib
import json
import re
from collections import Counter

import torch

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.evals.bench_decode import STEP_ROWS, patched_attributes, row_switches
from hf_deepseek.kernels import head_matmul, mla_chain, mla_decode_triton, mla_front, moe_gemv, moe_routing
from hf_deepseek.modeling import latent_cache
from hf_deepseek.modeling.decode_linear import use_decode_linears
from hf_deepseek.modeling.latent_cache import LatentStaticCache

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=16, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=6, n_group=4,
              topk_group=2, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64,
              qk_nope_head_dim=128, v_head_dim=128, num_nextn_predict_layers=0)  # fmt: skip
# variant: the `bench decode` row whose kernel switches it takes, over the launches-apart step (the default before
# 2026-12-06: every launch-saving kernel off), so that each variant counts what its own switches change
VARIANTS = {
    "launches-apart": "ours-fast",
    "default": "ours-fast-fewest-launches-router-norm",
    "head-matmul": "ours-fast-head-matmul",
    "gate-up": "ours-fast-gate-up",
    "q-kv-a": "ours-fast-q-kv-a",
    "separate-q-kv-a": "ours-fast-separate-q-kv-a",
    "norm-linear": "ours-fast-norm-linear",
    "unfolded": "ours-fast-unfolded",
    "all": "ours-fast-all-kernels",
    "fused-attn": "ours-fast-fused-attn",
    "mla-front": "ours-fast-mla-front",
    "fewest-launches": "ours-fast-fewest-launches",
    "fewest-launches-router-norm": "ours-fast-fewest-launches-router-norm",
    "mla-chain": "ours-fast-mla-chain",
    "input-norm": "ours-fast-input-norm",
    "separate-input-norm": "ours-fast-separate-input-norm",
}


@contextlib.contextmanager
def library_batched_matmuls():
    """Inductor's CPU lowering turns a batched matmul with one row into a fused loop (its GPU lowering does so only
    for a dot product), which would hide W_UK's and W_UV's cuBLAS launches: lower such products as the library call
    the GPU makes."""
    from torch._inductor import lowering

    aten_bmm = torch.ops.aten.bmm.default
    original = lowering.lowerings[aten_bmm]
    library = lowering.fallback_handler(aten_bmm, add_to_fallback_set=False)

    def bmm(mat1, mat2, *args, **kwargs):
        one_row = mat1.get_size()[1] == 1 or mat2.get_size()[2] == 1
        dot = mat1.get_size()[1] == 1 and mat2.get_size()[2] == 1
        return (
            library(mat1, mat2)
            if one_row and not dot and not args and not kwargs
            else original(mat1, mat2, *args, **kwargs)
        )

    lowering.lowerings[aten_bmm] = bmm
    try:
        yield
    finally:
        lowering.lowerings[aten_bmm] = original


@contextlib.contextmanager
def gpu_choices(row: str, baseline: bool = True):
    """The decode step's CUDA choices on the CPU: every kernel declared usable (their ops run their torch paths),
    Triton decode attention, and the kernel switches of the `bench decode` row named, over the launches-apart
    step's (`baseline`; else over the defaults); all restored afterwards."""
    patches = [
        (moe_gemv, "triton_available", lambda: True),
        (moe_gemv, "usable", lambda experts, x, pairs: pairs <= moe_gemv.MAX_PAIRS and not torch.is_grad_enabled()),
        (moe_gemv, "usable_linear", lambda rows, w: rows.shape[0] == 1 and not torch.is_grad_enabled()),
        (moe_routing, "_kernel_device", lambda x: True),
        (mla_decode_triton, "usable", lambda *args: True),
        (latent_cache, "DECODE_ATTENTION", "triton"),
        (head_matmul, "usable", lambda x, w: not torch.is_grad_enabled()),
        (mla_front, "usable", lambda q, kv_a, storage: mla_front.ENABLED and not torch.is_grad_enabled()),
        (mla_chain, "usable", lambda x, *args: mla_chain.ENABLED and x.shape[0] == 1 and not torch.is_grad_enabled()),
    ]
    base = STEP_ROWS["ours-fast-launches-apart" if baseline else "ours-fast"]
    with patched_attributes(patches), row_switches(base), row_switches(STEP_ROWS[row]):
        yield


def census(row: str, config: dict | None = None, baseline: bool = True) -> dict:
    """{"kernels": Inductor's kernels of one compiled decode step with `row`'s kernel switches (`gpu_choices`, over
    the launches-apart step's where `baseline`) in launch order, "ops": op calls by name}."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    cfg = DeepSeekConfig(**(config or CONFIG))
    model = DeepSeekForCausalLM(cfg).eval()  # fp32: Inductor keeps its batched matmuls as library calls, as on a GPU
    no_cache = torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False)  # lowered afresh
    with gpu_choices(row, baseline), library_batched_matmuls(), no_cache, torch.no_grad():
        use_decode_linears(model)
        cache = LatentStaticCache(cfg, max_cache_len=64)
        cache.unpadded = True
        model(torch.randint(3, cfg.vocab_size, (1, 20)), cache=cache, use_cache=True)  # the prefill, eager
        torch.compiler.reset()
        step = torch.compile(model.forward, dynamic=False)
        token, position = torch.randint(3, cfg.vocab_size, (1, 1)), torch.tensor([[20]])
        _, code = run_and_get_code(step, input_ids=token, position_ids=position, cache=cache, use_cache=True)
        torch.compiler.reset()
    call = "\n".join(code).split("def call(", 1)[1]
    kernels = re.findall(r"\n\s+(cpp_fused_\w+)\(", call)
    ops = re.findall(r"(torch\.ops\.\w+\.\w+|extern_kernels\.\w+)(?:\.default)?\(", call)
    return {"kernels": [re.sub(r"_\d+$", "", k) for k in kernels], "ops": dict(Counter(ops))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    results = {}
    for variant in args.variants.split(","):
        row = VARIANTS[variant]
        result = census(row)
        results[variant] = result
        launches = len(result["kernels"]) + sum(result["ops"].values())
        print(f"{variant}: {launches} launches ({len(result['kernels'])} Inductor kernels, op calls {result['ops']})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"torch": torch.__version__, "config": CONFIG, "variants": results}, out, indent=1)


if __name__ == "__main__":
    main()
