"""`hf-deepseek bench train`: the training step of transformers' `DeepseekV3ForCausalLM`, of this project in bf16
and of this project in FP8, on the same config and the same batches, one after the other in one run.

Each variant builds its model from the same seed at the same shapes (no MTP layer, so every model computes the
same next-token loss), trains `warmup_steps + steps` AdamW steps (ours `kernels.adamw.TritonAdamW`, as the trainers on
CUDA; transformers' and the `-torch-adamw` variants torch's fused AdamW; bf16 weights, as the peer figure in
REFERENCE.md) and reports the median step time, tokens/s, model FLOPs utilisation, peak memory and the losses.
The batches alternate between two, whose rows repeat short random token patterns, so the loss falls within a few
steps and the FP8 run can be compared with the bf16 run at matched data (`mean_loss`: mean over all steps; the
per-step `losses` are kept too).

Model FLOPs per step (`step_flops`): tokens x (6 x active matmul parameters + the causal attention term
6 x layers x heads x (qk_head_dim + v_head_dim) x (T + 1) / 2). Active matmul parameters are the weights that
multiply each token: attention projections, dense MLPs, shared experts, `num_experts_per_tok` routed experts, the
routers and the output head, not the input embedding. `flops_6n` is 6 x active parameters x tokens alone, the
count REFERENCE.md uses for transformers' ~274 TFLOP/s. MFU = model FLOP/s over the bf16 matmul peak (790 TFLOP/s
measured on the H200 here; `--peak-tflops`), for the FP8 variant too.
"""

import argparse
import gc
import json
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.evals.bench import FULL_CONFIG, TINY_CONFIG, bench_setup, machine_description, synchronize
from hf_deepseek.evals.bench_report import CPU_NOTE
from hf_deepseek.evals.graphed_train_step import GraphedTrainStep, eager_step, reset_optimizer_state
from hf_deepseek.generation.step_graphs import warm_up
from hf_deepseek.kernels import moe_routing
from hf_deepseek.modeling import joined_projections

PEER = "transformers"
OURS_EAGER, OURS, OURS_FP8 = "hf_deepseek-bf16-eager", "hf_deepseek-bf16", "hf_deepseek-fp8"
OURS_FP8_EAGER, OURS_FP8_ROWWISE = "hf_deepseek-fp8-eager", "hf_deepseek-fp8-rowwise"
OURS_FP8_ROWWISE_EAGER = "hf_deepseek-fp8-rowwise-eager"
OURS_FP8_EAGER_FP8_WGRAD = "hf_deepseek-fp8-eager-fp8-wgrad"  # the November FP8 step: experts' weight gradient in FP8
OURS_FP8_ROWWISE_BF16_DOWN = "hf_deepseek-fp8-rowwise-bf16-down"  # experts' down projection in bf16 (FP8 loses there)
OURS_FP8_ROWWISE_DENSE = "hf_deepseek-fp8-rowwise-dense"  # FP8 in the dense linears only: what they gain on their own
OURS_FP8_ROWWISE_TRITON_QUANT = "hf_deepseek-fp8-rowwise-triton-quant"  # Triton quantisers, not Inductor's reductions
OURS_FP8_ROWWISE_HP_WGRAD = "hf_deepseek-fp8-rowwise-hp-wgrad"  # linears: weight gradient in bf16 (torchao gw_hp)
# the experts' token rows laid out by expert in bf16, then quantised (before `FP8Recipe.quantize_tokens_once`)
OURS_FP8_ROWWISE_LAID_OUT = "hf_deepseek-fp8-rowwise-triton-quant-laid-out"
# the gradients' FP8 GEMMs promoted to FP32 as they sum (only the forward's with fast accumulation)
OURS_FP8_ROWWISE_PRECISE_GRADS = "hf_deepseek-fp8-rowwise-triton-quant-precise-grads"
# the Triton quantisers and the linear layers' weight gradient in bf16: x^T and dy^T, the two costliest quantisations
# a linear layer has (reductions along the tokens), not made at all, for bf16 weight-gradient GEMMs
OURS_FP8_ROWWISE_TRITON_HP_WGRAD = "hf_deepseek-fp8-rowwise-triton-quant-hp-wgrad"
# the Triton quantisers and FBGEMM's grouped GEMMs for the routed experts (FP8 rowwise products, bf16 weight
# gradient; the optional fbgemm-gpu-genai wheel)
OURS_FP8_ROWWISE_FBGEMM = "hf_deepseek-fp8-rowwise-triton-quant-fbgemm"
# and the linear layers' weight gradient in bf16 too: the two levers of the FP8 step's GEMM and quantiser time at once
OURS_FP8_ROWWISE_FBGEMM_HP_WGRAD = "hf_deepseek-fp8-rowwise-triton-quant-fbgemm-hp-wgrad"
# the rowwise recipe's choices until 2026-12-06 (Inductor-fused quantisation, torch's grouped GEMMs, the linears'
# weight gradient in FP8), which the variants below that name the rowwise recipe's other choices keep, so that each
# measures what it measured before the recipe took FBGEMM and the bf16 weight gradient
ROWWISE_BEFORE = {
    "fused_quantization": True,
    "grouped_gemm": "torch",
    "grouped_wgrad_gemm": "auto",
    "linear_wgrad": "fp8",
    "fused_moe_quantization": False,
    "joined_projections": False,
}
# the rowwise recipe with the routed experts' SwiGLU and combine gradient writing their FP8 operands themselves
# (`FP8Recipe.fused_moe_quantization`, `modeling/fp8_moe.py`; the recipe's default since 2026-12-06, spelt out), and
# with the experts' MLP layer by layer, a quantiser reading each operand again, as before
OURS_FP8_ROWWISE_FUSED_MOE = "hf_deepseek-fp8-rowwise-fused-moe"
OURS_FP8_ROWWISE_LAYER_BY_LAYER_MOE = "hf_deepseek-fp8-rowwise-layer-by-layer-moe"
# the rowwise recipe with the dense MLP's and shared experts' SwiGLU and its gradient writing their FP8 operands too
# (`FP8Recipe.fused_mlp_quantization`, `modeling/fp8_mlp.py`, opt-in)
OURS_FP8_ROWWISE_FUSED_MLP = "hf_deepseek-fp8-rowwise-fused-mlp"
# the rowwise recipe with its weights quantised once per optimizer step, by TritonAdamW's update
# (`FP8Recipe.cache_weights`, `modeling/fp8_weight_cache.py`), the experts' MLP layer by layer; and fused
OURS_FP8_ROWWISE_CACHED = "hf_deepseek-fp8-rowwise-cached-weights"
OURS_FP8_ROWWISE_CACHED_FUSED_MOE = "hf_deepseek-fp8-rowwise-cached-weights-fused-moe"
# the rowwise recipe with the experts' bf16 weight gradient through FBGEMM's kernel, as their FP8 products (the
# recipe's default before 2026-12-07, which takes torch's grouped GEMM for it: `FP8Recipe.grouped_wgrad_gemm`)
OURS_FP8_ROWWISE_FBGEMM_WGRAD = "hf_deepseek-fp8-rowwise-fbgemm-wgrad"
# the rowwise recipe with q_a/kv_a and gate/up as two GEMMs each (the recipe's default before 2026-12-07 joins them:
# `FP8Recipe.joined_projections`)
OURS_FP8_ROWWISE_SEPARATE = "hf_deepseek-fp8-rowwise-separate-projections"
# the rowwise recipe with the linear layers' weight gradient in FP8 (x^T and dy^T quantised along the tokens), which
# may pay where the dense layers are wide (`--shape v3-width`)
OURS_FP8_ROWWISE_LINEAR_FP8_WGRAD = "hf_deepseek-fp8-rowwise-linear-fp8-wgrad"
# and the routed experts' weight gradient in FP8 too (dy and x scaled per expert and column along its tokens, torch's
# `_scaled_grouped_mm` over two 2-D operands): every GEMM of the decoder layers in FP8
OURS_FP8_ROWWISE_FP8_WGRADS = "hf_deepseek-fp8-rowwise-fp8-wgrads"
# the paper's blockwise recipe with the routed experts' FP8 products through DeepGEMM (the optional sgl-deep-gemm
# wheel; the recipe's Triton kernels where it does not import): the input gradient from the forward's weight blocks
OURS_FP8_DEEP_GEMM = "hf_deepseek-fp8-deep-gemm"
# and the rowwise default's other choices: Triton quantisers, the linear layers' weight gradient in bf16
OURS_FP8_DEEP_GEMM_HP_WGRAD = "hf_deepseek-fp8-deep-gemm-hp-wgrad"
# the paper's recipe with the experts' FP8 products through FBGEMM's blockwise grouped GEMM
OURS_FP8_FBGEMM_BLOCKWISE = "hf_deepseek-fp8-fbgemm-blockwise"
# and the rowwise default's choices that do not touch the scaling: the linear layers' weight gradient in bf16 (no
# operand quantised along the tokens; in the paper's recipe 1x128 tiles of x^T and dy^T and a Triton or cuBLAS
# blockwise GEMM), torch's grouped GEMM for the experts' bf16 weight gradient, q_a/kv_a and gate/up joined
OURS_FP8_FBGEMM_BLOCKWISE_HP_WGRAD = "hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad"
BLOCKWISE_HP_WGRAD = {
    "grouped_gemm": "fbgemm",
    "grouped_wgrad_gemm": "torch",
    "linear_wgrad": "bf16",
    "joined_projections": True,
}
# and its weights' blocks (W's and W^T's) written once per optimizer step by its update (`FP8Recipe.cache_weights`)
OURS_FP8_FBGEMM_BLOCKWISE_CACHED = "hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad-cached-weights"
# or its routed experts' whole MLP in one function (`FP8Recipe.fused_moe_quantization`: the combine's gradient in one
# gather, the 1x128 tiles of its operands in the torch operations Inductor fuses with their producers); and both
OURS_FP8_FBGEMM_BLOCKWISE_FUSED_MOE = "hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad-fused-moe"
OURS_FP8_FBGEMM_BLOCKWISE_CACHED_FUSED_MOE = "hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad-cached-weights-fused-moe"
# FP8 variants -> (named recipe, compiled, recipe overrides): "deepseek" is the paper's blockwise recipe, "rowwise"
# torchtitan's; the uncompiled ones place differences between the compiled step and the kernels
FP8_VARIANTS = {
    OURS_FP8: ("deepseek", True, {}),
    OURS_FP8_ROWWISE: ("rowwise", True, {}),
    OURS_FP8_EAGER: ("deepseek", False, {}),
    OURS_FP8_ROWWISE_EAGER: ("rowwise", False, ROWWISE_BEFORE),
    OURS_FP8_EAGER_FP8_WGRAD: ("deepseek", False, {"grouped_wgrad": "fp8"}),
    OURS_FP8_ROWWISE_BF16_DOWN: ("rowwise", True, {**ROWWISE_BEFORE, "grouped_bf16": ("down_proj",)}),
    OURS_FP8_ROWWISE_DENSE: ("rowwise", True, {**ROWWISE_BEFORE, "grouped_bf16": ("gate_up_proj", "down_proj")}),
    OURS_FP8_ROWWISE_TRITON_QUANT: ("rowwise", True, {**ROWWISE_BEFORE, "fused_quantization": False}),
    OURS_FP8_ROWWISE_HP_WGRAD: ("rowwise", True, {**ROWWISE_BEFORE, "linear_wgrad": "bf16"}),
    OURS_FP8_ROWWISE_LAID_OUT: (
        "rowwise",
        True,
        {**ROWWISE_BEFORE, "fused_quantization": False, "quantize_tokens_once": False},
    ),
    OURS_FP8_ROWWISE_PRECISE_GRADS: (
        "rowwise",
        True,
        {**ROWWISE_BEFORE, "fused_quantization": False, "fast_accum": ("output",)},
    ),
    OURS_FP8_ROWWISE_TRITON_HP_WGRAD: (
        "rowwise",
        True,
        {**ROWWISE_BEFORE, "fused_quantization": False, "linear_wgrad": "bf16"},
    ),
    OURS_FP8_ROWWISE_FBGEMM: (
        "rowwise",
        True,
        {**ROWWISE_BEFORE, "fused_quantization": False, "grouped_gemm": "fbgemm"},
    ),
    # the rowwise recipe's choices of early 2026-12-06 (before the fused experts' MLP and torch's weight gradient)
    OURS_FP8_ROWWISE_FBGEMM_HP_WGRAD: (
        "rowwise",
        True,
        {**ROWWISE_BEFORE, "fused_quantization": False, "grouped_gemm": "fbgemm", "linear_wgrad": "bf16"},
    ),
    OURS_FP8_ROWWISE_FUSED_MOE: ("rowwise", True, {"fused_moe_quantization": True}),
    OURS_FP8_ROWWISE_LAYER_BY_LAYER_MOE: ("rowwise", True, {"fused_moe_quantization": False}),
    OURS_FP8_ROWWISE_FUSED_MLP: ("rowwise", True, {"fused_mlp_quantization": True}),
    OURS_FP8_ROWWISE_CACHED: ("rowwise", True, {"cache_weights": True, "fused_moe_quantization": False}),
    OURS_FP8_ROWWISE_CACHED_FUSED_MOE: ("rowwise", True, {"cache_weights": True, "fused_moe_quantization": True}),
    OURS_FP8_ROWWISE_FBGEMM_WGRAD: ("rowwise", True, {"grouped_wgrad_gemm": "fbgemm"}),
    OURS_FP8_ROWWISE_SEPARATE: ("rowwise", True, {"joined_projections": False}),
    OURS_FP8_ROWWISE_LINEAR_FP8_WGRAD: ("rowwise", True, {"linear_wgrad": "fp8"}),
    OURS_FP8_ROWWISE_FP8_WGRADS: ("rowwise", True, {"linear_wgrad": "fp8", "grouped_wgrad": "fp8"}),
    OURS_FP8_DEEP_GEMM: ("deepseek", True, {"grouped_gemm": "deep_gemm"}),
    OURS_FP8_DEEP_GEMM_HP_WGRAD: (
        "deepseek",
        True,
        {"grouped_gemm": "deep_gemm", "fused_quantization": False, "linear_wgrad": "bf16"},
    ),
    OURS_FP8_FBGEMM_BLOCKWISE: ("deepseek", True, {"grouped_gemm": "fbgemm"}),
    OURS_FP8_FBGEMM_BLOCKWISE_HP_WGRAD: ("deepseek", True, BLOCKWISE_HP_WGRAD),
    OURS_FP8_FBGEMM_BLOCKWISE_CACHED: ("deepseek", True, {**BLOCKWISE_HP_WGRAD, "cache_weights": True}),
    OURS_FP8_FBGEMM_BLOCKWISE_FUSED_MOE: ("deepseek", True, {**BLOCKWISE_HP_WGRAD, "fused_moe_quantization": True}),
    OURS_FP8_FBGEMM_BLOCKWISE_CACHED_FUSED_MOE: (
        "deepseek",
        True,
        {**BLOCKWISE_HP_WGRAD, "cache_weights": True, "fused_moe_quantization": True},
    ),
}
OURS_UNFUSED_LOSS = "hf_deepseek-bf16-unfused-loss"  # full logits, then the compiled loss
# our variants update with `kernels.adamw.TritonAdamW`, as the trainers do on CUDA; a variant name + TORCH_ADAMW: the
# same step with torch's fused AdamW (what transformers' variant uses)
TORCH_ADAMW = "-torch-adamw"
OURS_TORCH_ADAMW, OURS_FP8_TORCH_ADAMW = OURS + TORCH_ADAMW, OURS_FP8_ROWWISE_TRITON_QUANT + TORCH_ADAMW
# a variant name + TORCH_ROUTER: the same step with torch's routing (three top-k a MoE layer) where the router kernel
# chooses the experts (`kernels.moe_routing.route_indices`)
TORCH_ROUTER = "-torch-router"
OURS_TORCH_ROUTER = OURS + TORCH_ROUTER
# a variant name + LOSS_CHUNKS_16: the head and its loss in 16 chunks of tokens rather than 8 (half the logits and
# their gradient alive at once, at the end of the forward where the activations are all kept)
LOSS_CHUNKS_16 = "-loss-chunks-16"
OURS_LOSS_CHUNKS_16, OURS_FP8_LOSS_CHUNKS_16 = OURS + LOSS_CHUNKS_16, OURS_FP8_ROWWISE_TRITON_QUANT + LOSS_CHUNKS_16
# a variant name + JOINED: the same step with q_a/kv_a and gate/up each as one GEMM over their joined weights
# (`modeling.joined_projections`, opt-in)
JOINED = "-joined-projections"
OURS_JOINED, OURS_FP8_JOINED = OURS + JOINED, OURS_FP8_ROWWISE_TRITON_QUANT + JOINED
CUDA_GRAPH = "-cuda-graph"  # the whole step captured in one CUDA graph, replayed (`graphed_train_step.py`)
OURS_CUDA_GRAPH, OURS_FP8_CUDA_GRAPH = OURS + CUDA_GRAPH, OURS_FP8_ROWWISE + CUDA_GRAPH
OURS_FP8_FBGEMM_JOINED = OURS_FP8_ROWWISE_FBGEMM + JOINED
OURS_FP8_FBGEMM_HP_WGRAD_JOINED = OURS_FP8_ROWWISE_FBGEMM_HP_WGRAD + JOINED
VARIANTS = (
    PEER, OURS_EAGER, OURS, OURS_UNFUSED_LOSS, *FP8_VARIANTS, OURS_TORCH_ADAMW, OURS_FP8_TORCH_ADAMW, OURS_TORCH_ROUTER,
    OURS_LOSS_CHUNKS_16, OURS_FP8_LOSS_CHUNKS_16, OURS_JOINED, OURS_FP8_JOINED, OURS_FP8_FBGEMM_JOINED,
    OURS_FP8_FBGEMM_HP_WGRAD_JOINED, OURS_CUDA_GRAPH, OURS_FP8_CUDA_GRAPH,
)  # fmt: skip
DEFAULT_VARIANTS = (PEER, OURS, OURS_FP8, OURS_FP8_ROWWISE)


@dataclass
class TrainBenchPlan:
    config: dict[str, Any]
    batch_size: int = 8
    seq_len: int = 2048
    warmup_steps: int = 3
    steps: int = 10
    learning_rate: float = 3e-4
    pattern_len: int = 64  # each row repeats a random pattern of this many tokens: a loss that falls quickly
    peak_tflops: float = 790.0  # bf16 dense matmul measured on the H200 (REFERENCE.md)
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    profile: bool = False  # a kernel-time table of one step of each of our variants (`profile_variants`: of those)
    profile_variants: list[str] | None = None
    # trajectories of the matched-loss comparison: the timed one, then loss_seeds - 1 more from the same initial
    # weights over batches of other random patterns (one trajectory is one sample of a discrete routing's path:
    # several tell a recipe's systematic difference from bf16 from one trajectory's chance)
    loss_seeds: int = 1


# the REFERENCE.md training config (8 layers, hidden 2048, 64 experts top-6), without the MTP layer
FULL_TRAIN_PLAN = TrainBenchPlan({**FULL_CONFIG, "num_nextn_predict_layers": 0})
# DeepSeek-V3's width (hidden 7168, MLA with 128 heads and V3's ranks, experts of width 2048, top-8): one dense
# and three MoE layers of 64 experts, the vocabulary cut to 16k so that, as in the 61-layer model, the decoder
# layers and not the output head dominate the FLOPs; 10.0B parameters; batch 4 x 2048, sized (not yet run) for one H200
V3_WIDTH_CONFIG = FULL_CONFIG | dict(  # the bench's MLA ranks, 64 experts in 8 groups, 1 dense layer
    vocab_size=16384,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=128,
    n_shared_experts=1,
    num_experts_per_tok=8,
    num_nextn_predict_layers=0,
    max_position_embeddings=4096,
)
V3_WIDTH_TRAIN_PLAN = TrainBenchPlan(V3_WIDTH_CONFIG, batch_size=4, variants=[OURS, OURS_FP8, OURS_FP8_ROWWISE])
# the bench's layer kinds at a quarter of its width and a quarter of its vocabulary (4 layers, hidden 512, 32 experts
# top-6 in 8 groups, vocabulary 32,768; batch 4 x 512): the same fast fall of the loss (10.5 -> 7.7 in two steps),
# small enough for a CPU to compare bf16 with emulated FP8 step by step (~5 s a bf16 step on one core)
SMALL_CONFIG = TINY_CONFIG | dict(
    vocab_size=32768, hidden_size=512, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, n_routed_experts=32, num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=2,
    q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    num_nextn_predict_layers=0,
)  # fmt: skip
SMALL_TRAIN_PLAN = TrainBenchPlan(SMALL_CONFIG, batch_size=4, seq_len=512)
SHAPES = {"bench": FULL_TRAIN_PLAN, "v3-width": V3_WIDTH_TRAIN_PLAN, "small": SMALL_TRAIN_PLAN}
TINY_TRAIN_PLAN = TrainBenchPlan(
    {**TINY_CONFIG, "num_nextn_predict_layers": 0},
    batch_size=2,
    seq_len=32,
    warmup_steps=1,
    steps=2,
    pattern_len=8,
    variants=list(VARIANTS),
)


@dataclass
class TrainResult:
    name: str
    parameters: int = 0
    step_ms: float | None = None  # median over the timed steps
    tokens_per_s: float | None = None
    model_tflops: float | None = None  # step_flops / step time
    tflops_6n: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    losses: list[float] = field(default_factory=list)
    final_loss: float | None = None  # mean of the last 3 steps
    mean_loss: float | None = None  # mean over all steps: the matched-loss comparison (the curve falls to ~0)
    seed_losses: list[list[float]] = field(default_factory=list)  # each trajectory's losses, the timed one first
    mean_loss_over_seeds: float | None = None  # mean of every trajectory's mean loss
    note: str = ""


def active_matmul_parameters(config: DeepSeekConfig) -> int:
    """Weights that multiply each token in one forward (the input embedding is a lookup, not counted)."""
    d, heads = config.hidden_size, config.num_attention_heads
    qk, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    rank = config.q_lora_rank
    q = d * heads * qk if rank is None else d * rank + rank * heads * qk
    kv_up = config.kv_lora_rank * heads * (config.qk_nope_head_dim + v)
    kv = d * (config.kv_lora_rank + config.qk_rope_head_dim) + kv_up
    attention = q + kv + heads * v * d
    dense = 3 * d * config.intermediate_size
    expert = 3 * d * config.moe_intermediate_size
    moe = expert * (config.n_shared_experts + config.num_experts_per_tok) + d * config.n_routed_experts
    layers = sum(attention + (moe if config.is_moe_layer(i) else dense) for i in range(config.num_hidden_layers))
    return layers + d * config.vocab_size


def step_flops(config: DeepSeekConfig, batch_size: int, seq_len: int) -> tuple[float, float]:
    """(model FLOPs of one training step, the 6 x active parameters x tokens part alone)."""
    tokens = batch_size * seq_len
    flops_6n = 6.0 * active_matmul_parameters(config) * tokens
    heads, qk = config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim
    attention = 6.0 * config.num_hidden_layers * heads * (qk + config.v_head_dim) * (seq_len + 1) / 2 * tokens
    return flops_6n + attention, flops_6n


def training_batches(
    plan: TrainBenchPlan, vocab: int, count: int, device: torch.device, seed: int = 0
) -> list[torch.Tensor]:
    """`count` batches [B, T] (the same for every variant), cycling over two distinct ones whose rows repeat a
    random pattern: seen again every other step, they are learnt within a few steps, so losses can be compared.
    `seed` picks the patterns (0: the timed trajectory's)."""
    gen = torch.Generator().manual_seed(1234 + seed)
    repeats = -(-plan.seq_len // plan.pattern_len)
    distinct = []
    for _ in range(2):
        pattern = torch.randint(0, vocab, (plan.batch_size, plan.pattern_len), generator=gen)
        distinct.append(pattern.repeat(1, repeats)[:, : plan.seq_len].to(device))
    return [distinct[i % 2] for i in range(count)]


def base_variant(name: str) -> str:
    """The variant's model and step without its choices of optimizer, router, loss chunks and joined projections."""
    for suffix in (TORCH_ADAMW, TORCH_ROUTER, LOSS_CHUNKS_16, JOINED, CUDA_GRAPH):
        name = name.removesuffix(suffix)
    return name


def compiled(name: str) -> bool:
    """Whether the variant compiles its layers (on CUDA; CPU runs stay eager)."""
    name = base_variant(name)
    return name in (OURS, OURS_UNFUSED_LOSS) or FP8_VARIANTS.get(name, ("", False, {}))[1]


def variant_recipe(name: str):
    """The FP8Recipe of an FP8 variant (its named recipe with its overrides), None for the others."""
    if base_variant(name) not in FP8_VARIANTS:
        return None
    from hf_deepseek.modeling.fp8 import FP8Recipe

    recipe, _, overrides = FP8_VARIANTS[base_variant(name)]
    return FP8Recipe.named(recipe, **overrides)


def grouped_kernels_note(name: str, device: torch.device) -> str:
    """For an FP8 variant whose recipe asks for FBGEMM's grouped GEMMs, on a GPU: whether its routed experts got them
    (the rowwise recipe's defaults fall back to torch's kernels where the fbgemm-gpu-genai wheel does not import)."""
    recipe = variant_recipe(name)
    if recipe is None or recipe.grouped_gemm == "torch" or device.type != "cuda":
        return ""
    if recipe.grouped_gemm == "deep_gemm":
        from hf_deepseek.kernels import deep_gemm_grouped

        found = deep_gemm_grouped.available()
        return (
            "experts: DeepGEMM's grouped GEMMs"
            if found
            else "experts: Triton's grouped GEMMs (sgl-deep-gemm not found)"
        )
    from hf_deepseek.kernels import fbgemm_grouped

    if recipe.scaling == "blockwise":
        if fbgemm_grouped.blockwise_available():
            return "experts: FBGEMM's blockwise grouped GEMM"
        return "experts: Triton's grouped GEMMs (FBGEMM's blockwise kernel not found)"
    if fbgemm_grouped.available():
        return "experts: FBGEMM's grouped GEMMs"
    return "experts: torch's grouped GEMMs (fbgemm-gpu-genai not found)"


def build_model(name: str, config: DeepSeekConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The variant's model, initialised from seed 0 on `device` (our variants share their initial weights)."""
    torch.manual_seed(0)
    loss_chunks = 16 if name.endswith(LOSS_CHUNKS_16) else 8
    name = base_variant(name)
    if name == PEER:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        peer_config = DeepseekV3Config(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
        with torch.device(device):
            return DeepseekV3ForCausalLM._from_config(peer_config, dtype=dtype).train()
    with torch.device(device):
        model = DeepSeekForCausalLM._from_config(config, dtype=dtype).train()
    if name != OURS_UNFUSED_LOSS:
        from hf_deepseek.modeling.output_loss import enable_fused_output_loss

        enable_fused_output_loss(model, loss_chunks)  # the head + cross-entropy in chunks: no [tokens, vocab] logits
    if name in FP8_VARIANTS:
        from hf_deepseek.modeling.fp8 import convert_to_fp8_training

        # a variant that names FBGEMM fails without it; the rowwise recipe's defaults fall back (grouped_kernels_note)
        if FP8_VARIANTS[name][2].get("grouped_gemm") == "fbgemm" and device.type == "cuda":
            from hf_deepseek.kernels import fbgemm_grouped

            if not fbgemm_grouped.available():
                raise RuntimeError(f"{name} needs the fbgemm-gpu-genai wheel on a Hopper GPU (pip install '.[fbgemm]')")
        convert_to_fp8_training(model, variant_recipe(name))
    if compiled(name) and device.type == "cuda":
        from hf_deepseek.modeling.compile_regions import compile_for_training

        compile_for_training(model)
    return model


def run_steps(step, batches: list[torch.Tensor], device: torch.device) -> tuple[list[float], list]:
    """`step(input_ids) -> loss` (`graphed_train_step.eager_step` or a captured one) per batch; returns (each step's
    milliseconds, each step's loss, detached and copied)."""
    times, losses = [], []
    for input_ids in batches:
        synchronize(device)
        start = time.perf_counter()
        loss = step(input_ids)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
        losses.append(loss.detach().clone())
    return times, losses


def bench_variant(
    name: str, plan: TrainBenchPlan, config: DeepSeekConfig, device: torch.device, dtype: torch.dtype, out: Path
) -> TrainResult:
    result = TrainResult(name)
    model = optimizer = step = None
    graphed = name.endswith(CUDA_GRAPH) and device.type == "cuda"
    router_kernel, joined = moe_routing.ENABLED, joined_projections.ENABLED
    moe_routing.ENABLED = router_kernel and not name.endswith(TORCH_ROUTER)  # read when the step compiles
    joined_projections.ENABLED = joined or name.endswith(JOINED)
    try:
        model = build_model(name, config, device, dtype)
        result.parameters = sum(p.numel() for p in model.parameters())
        if name == PEER:
            result.note = f"experts: {getattr(model.config, '_experts_implementation', None)}"
        elif compiled(name) and device.type != "cuda":
            result.note = "not compiled off CUDA"
        else:
            result.note = grouped_kernels_note(name, device)
        if name == PEER or name.endswith(TORCH_ADAMW):
            optimizer = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, fused=device.type == "cuda")
        else:
            from hf_deepseek.kernels.adamw import TritonAdamW

            optimizer = TritonAdamW(model.parameters(), lr=plan.learning_rate, capturable=graphed)
        batches = training_batches(plan, config.vocab_size, plan.warmup_steps + plan.steps, device)
        initial = snapshot(model) if plan.loss_seeds > 1 else None
        step = eager_step(model, optimizer)

        warm = partial(run_steps, step, batches[: plan.warmup_steps], device)
        warm_losses = (warm_up(warm) if graphed else warm())[1]  # a capture's warm-up: on a side stream
        if device.type == "cuda":  # before a capture: its allocations are those of the step it replays
            torch.cuda.reset_peak_memory_stats(device)
        if graphed:
            step = GraphedTrainStep(model, optimizer, batches[plan.warmup_steps])  # captured, not run
        times, losses = run_steps(step, batches[plan.warmup_steps :], device)
        result.losses = [float(x) for x in warm_losses + losses]
        result.final_loss = statistics.fmean(result.losses[-3:])
        result.mean_loss = statistics.fmean(result.losses)
        step_s = statistics.median(times) / 1000
        flops, flops_6n = step_flops(config, plan.batch_size, plan.seq_len)
        result.step_ms = 1000 * step_s
        result.tokens_per_s = plan.batch_size * plan.seq_len / step_s
        result.model_tflops, result.tflops_6n = flops / step_s / 1e12, flops_6n / step_s / 1e12
        result.mfu = result.model_tflops / plan.peak_tflops
        if device.type == "cuda":
            result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        if plan.profile and name != PEER and (plan.profile_variants is None or name in plan.profile_variants):
            table = profile_step(step, batches[:1], device, out / f"profile_{name}.txt")
            print(f"{name}: one step after warm-up\n{table}", flush=True)
        result.seed_losses = [result.losses]
        for seed in range(1, plan.loss_seeds):  # after the timed steps, the profile and the peak memory
            restore(model, initial)
            reset_optimizer_state(optimizer)  # moments and step counts start again, in place (a graph reads them)
            more = training_batches(plan, config.vocab_size, plan.warmup_steps + plan.steps, device, seed)
            result.seed_losses.append([float(x) for x in run_steps(step, more, device)[1]])
        result.mean_loss_over_seeds = statistics.fmean(statistics.fmean(x) for x in result.seed_losses)
    except Exception as error:  # one variant failing (out of memory, a compile error) must not lose the others
        result.note = (result.note + "; " if result.note else "") + f"failed: {type(error).__name__}: {error}"[:600]
        traceback.print_exc()  # the whole story in the run's log; the note keeps its first 600 characters
    finally:
        moe_routing.ENABLED, joined_projections.ENABLED = router_kernel, joined
        del model, optimizer, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers (the routers' balancing biases among them), copied to the host."""
    return {key: t.detach().to("cpu", copy=True) for key, t in model.state_dict().items()}


@torch.no_grad()
def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`snapshot`'s values written back in place: the compiled graphs stay, FP8 weight copies see a changed weight."""
    for key, t in model.state_dict().items():
        t.copy_(state[key])


def profile_step(step, batches, device: torch.device, path: Path, top: int = 60) -> str:
    """Where a step's time goes: the `top` kernels by total device time over `batches` (one optimizer step each,
    after warm-up) and the time per kind of kernel; written to `path` (with torch's operator table below it) and
    returned."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        run_steps(step, batches, device)
    kernels: dict[str, list[float]] = {}  # name -> [microseconds, calls]
    intervals = []  # (start us, end us, name) of every kernel
    runtime_calls = []  # (CUDA runtime call, host microseconds, the operator that made it)
    for event in prof.events():
        if on_cuda and event.name in HOST_WAIT_CALLS:
            parent = event.cpu_parent
            runtime_calls.append((event.name, event.time_range.elapsed_us(), parent.name if parent else "(none)"))
        # on the GPU, a record_function range (the optimizer's step) is an annotation over kernels counted already
        annotation = on_cuda and getattr(event, "is_user_annotation", False)
        if (event.device_type != DeviceType.CPU) == on_cuda and (on_cuda or not event.cpu_parent) and not annotation:
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
            intervals.append((event.time_range.start, event.time_range.end, event.name))
    steps = max(1, len(batches))
    total = sum(us for us, _ in kernels.values())
    kinds: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
    lines = [f"{'device' if on_cuda else 'top-level CPU'} time per step: {total / 1000 / steps:.1f} ms", ""]
    lines += [
        f"{kind:<22} {us / 1000 / steps:8.2f} ms {us / total:6.1%}"
        for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])
    ]
    if on_cuda:  # the device's idle time inside the profiled steps, by the kernel each gap follows
        span, busy, after = idle_gaps(intervals)
        lines += ["", f"idle between kernels: {(span - busy) / 1000 / steps:.2f} ms a step, in gaps after:"]
        lines += [f"{us / 1000 / steps:8.2f} ms {count // steps:6d} gaps  {name[:150]}" for name, us, count in after]
        lines += [
            "",
            "host waits on the device (CUDA runtime calls that block or may block), by the operator making them:",
        ]
        lines += [
            f"{us / 1000 / steps:8.2f} ms {count // steps:6d} calls  {call} in {op[:120]}"
            for call, op, us, count in host_waits(runtime_calls)
        ]
    lines += ["", f"{'ms/step':>8} {'share':>6} {'calls':>6}  kernel"]
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / 1000 / steps:8.2f} {us / total:6.1%} {calls // steps:6d}  {name[:150]}")
    table = "\n".join(lines)
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    operators = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
    path.write_text(f"{table}\n\n{operators}")
    return table


def idle_gaps(intervals: list[tuple[float, float, str]], top: int = 12) -> tuple[float, float, list]:
    """Kernels' (start, end, name) intervals -> (span from the first start to the last end, time some kernel runs,
    the `top` kernels after which the device stood idle longest: [(name, idle time after it, gaps)]). A gap
    belongs to the kernel that ended last before it; overlapping kernels (other streams) count once."""
    span = busy = 0.0
    after: dict[str, list[float]] = {}
    ordered = sorted(intervals)
    if ordered:
        span = max(end for _, end, _ in ordered) - ordered[0][0]
        start0, end0, last = ordered[0]
        busy, reach = end0 - start0, end0
        for start, end, name in ordered[1:]:
            if start > reach:
                entry = after.setdefault(last, [0.0, 0])
                entry[0] += start - reach
                entry[1] += 1
            busy += max(0.0, end - max(start, reach))
            if end >= reach:
                reach, last = end, name
    ranked = sorted(((name, us, int(n)) for name, (us, n) in after.items()), key=lambda e: -e[1])
    return span, busy, ranked[:top]


# the CUDA runtime calls after which the host may wait for the device: a synchronisation, a copy to pageable host
# memory, or a free of device memory (the caching allocator's, when it runs short)
HOST_WAIT_CALLS = frozenset({
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
    "cudaFree", "cudaMalloc",
})  # fmt: skip


def host_waits(calls: list[tuple[str, float, str]], top: int = 12) -> list[tuple[str, str, float, int]]:
    """(runtime call, host microseconds, operator that made it) -> the `top` (call, operator) pairs by total host
    time: [(call, operator, microseconds, count)]."""
    totals: dict[tuple[str, str], list[float]] = {}
    for call, us, op in calls:
        entry = totals.setdefault((call, op), [0.0, 0])
        entry[0] += us
        entry[1] += 1
    ranked = sorted(((call, op, us, int(n)) for (call, op), (us, n) in totals.items()), key=lambda e: -e[2])
    return ranked[:top]


KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("fp8 GEMM", ("f8f8", "e4m3", "fp8", "scaled_mm", "_gemm_kernel", "_wgrad_kernel")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss", ("_cross_entropy_kernel",)),  # the chunked loss's kernel (`output_loss.py`)
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "grouped_mm", "matmul")),
    # the Triton quantisers, and the fused MoE kernels that write FP8 rows (fp8_moe.py)
    ("quantise", ("_quant_rows", "_quant_blocks", "_rowwise_rows", "_rowwise_cols", "_rows_kernel")),
    ("Triton (fused)", ("triton",)),
    ("copy / index", ("copy", "index", "gather", "scatter", "cat", "elementwise", "reduce", "sort", "fill")),
)
# Inductor's pointwise and reduction kernels: named after the ops they fuse (a quantiser feeding `_scaled_mm` or
# FBGEMM's GEMM included), never a GEMM themselves; those that take an amax or scale values (clamp and divide) quantise
INDUCTOR_KERNELS = ("triton_poi", "triton_red", "triton_per")


def kernel_kind(name: str) -> str:
    lower = name.lower()
    if lower.startswith(INDUCTOR_KERNELS) and "logsumexp" in lower:  # Inductor's kernel of the chunked loss
        return "loss"
    if lower.startswith(INDUCTOR_KERNELS):
        return "quantise" if "amax" in lower or ("clamp" in lower and "div" in lower) else "Triton (fused)"
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lower for k in keys)), "other")


def ratios(results: list[TrainResult]) -> dict[str, float]:
    """Each of our variants' speed against transformers', each FP8 variant's speed and mean loss against the bf16
    step with the same optimizer (and capture), and each captured step's against the same step run plainly."""
    by_name = {r.name: r for r in results if r.tokens_per_s}
    out = {}
    for name in [n for n in by_name if n != PEER]:
        if PEER in by_name:
            out[f"{name} / {PEER}"] = by_name[name].tokens_per_s / by_name[PEER].tokens_per_s
    for fp8 in by_name:
        bf16 = OURS + fp8.removeprefix(base_variant(fp8))  # our bf16 step with the FP8 variant's optimizer
        if base_variant(fp8) in FP8_VARIANTS and bf16 in by_name:
            out[f"{fp8} / {bf16}"] = by_name[fp8].tokens_per_s / by_name[bf16].tokens_per_s
            if by_name[bf16].mean_loss:
                out[f"{fp8} mean loss relative to {bf16}"] = by_name[fp8].mean_loss / by_name[bf16].mean_loss - 1
            seeds = len(by_name[fp8].seed_losses)
            if seeds > 1 and len(by_name[bf16].seed_losses) == seeds:
                relative = by_name[fp8].mean_loss_over_seeds / by_name[bf16].mean_loss_over_seeds - 1
                out[f"{fp8} mean loss over {seeds} seeds relative to {bf16}"] = relative
    for graphed in [n for n in by_name if n.endswith(CUDA_GRAPH)]:  # the captured step against the same one plain
        plain = graphed.removesuffix(CUDA_GRAPH)
        if plain in by_name:
            out[f"{graphed} / {plain}"] = by_name[graphed].tokens_per_s / by_name[plain].tokens_per_s
            if by_name[plain].mean_loss:
                out[f"{graphed} mean loss relative to {plain}"] = (
                    by_name[graphed].mean_loss / by_name[plain].mean_loss - 1
                )
    return out


def markdown_table(results: list[TrainResult]) -> str:
    def fmt(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    seeds = max((len(r.seed_losses) for r in results), default=0)
    over_seeds = f" mean loss, {seeds} seeds |" if seeds > 1 else ""
    rows = [
        "| variant | step ms | tokens/s | model TFLOP/s | 6N TFLOP/s | MFU | peak GiB | mean loss |"
        + f"{over_seeds} note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if over_seeds else "") + "---|",
    ]
    for r in results:
        rows.append(
            f"| {r.name} | {fmt(r.step_ms, '.1f')} | {fmt(r.tokens_per_s, ',.0f')} | {fmt(r.model_tflops, '.1f')} | "
            f"{fmt(r.tflops_6n, '.1f')} | {fmt(r.mfu, '.1%')} | {fmt(r.peak_memory_gib, '.2f')} | "
            f"{fmt(r.mean_loss, '.4f')} |"
            + (f" {fmt(r.mean_loss_over_seeds, '.4f')} |" if over_seeds else "")
            + f" {r.note} |"
        )
    return "\n".join(rows)


def run_train_bench(
    plan: TrainBenchPlan,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    output_dir: str | Path = "outputs/bench-train",
    progress: Callable[[str], None] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Measure every variant of `plan`; write `bench_train.json` and `bench_train.md`; return the results."""
    device, dtype, out, progress = bench_setup(device, dtype, output_dir, progress)
    unknown = [v for v in plan.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    config = DeepSeekConfig(**plan.config)
    flops, flops_6n = step_flops(config, plan.batch_size, plan.seq_len)
    results: dict[str, Any] = {
        "command": command,
        "machine": machine_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "plan": asdict(plan),
        "active_matmul_parameters": active_matmul_parameters(config),
        "step_flops": flops,
        "step_flops_6n": flops_6n,
        "variants": [],
    }
    measured: list[TrainResult] = []
    for name in plan.variants:
        progress(f"{name}: building and training {plan.warmup_steps} + {plan.steps} steps")
        result = bench_variant(name, plan, config, device, dtype, out)
        measured.append(result)
        if result.tokens_per_s:
            progress(
                f"{name}: {result.step_ms:.1f} ms/step, {result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%}, "
                f"peak {result.peak_memory_gib or 0:.1f} GiB, mean loss {result.mean_loss:.4f}; losses "
                + " ".join(f"{x:.3f}" for x in result.losses)
                + (
                    f"; mean loss of each of {len(result.seed_losses)} seeds "
                    + " ".join(f"{statistics.fmean(x):.4f}" for x in result.seed_losses)
                    if len(result.seed_losses) > 1
                    else ""
                )
            )
        else:
            progress(f"{name}: {result.note}")
        results["variants"] = [asdict(r) for r in measured]
        results["ratios"] = ratios(measured)
        (out / "bench_train.json").write_text(json.dumps(results, indent=2))
        (out / "bench_train.md").write_text(f"`{command}`\n\n{markdown_table(measured)}\n")
    print(markdown_table(measured), flush=True)
    if device.type == "cpu":
        print(CPU_NOTE, flush=True)
    for key, value in results["ratios"].items():
        print(f"{key}: {value:.3f}", flush=True)
    return results


def plan_from_args(args: argparse.Namespace) -> TrainBenchPlan:
    shape = getattr(args, "shape", None) or "bench"
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
    plan = TrainBenchPlan(**asdict(TINY_TRAIN_PLAN if args.tiny else SHAPES[shape]))
    for name in ("batch_size", "seq_len", "steps", "warmup_steps", "peak_tflops", "loss_seeds"):
        value = getattr(args, name, None)  # (a Namespace built by hand may lack the newer options)
        if value is not None:
            setattr(plan, name, value)
    if args.variants:
        plan.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    plan.profile = args.profile or bool(getattr(args, "profile_variants", None))
    if getattr(args, "profile_variants", None):
        plan.profile_variants = [v.strip() for v in args.profile_variants.split(",") if v.strip()]
    return plan


def run_train_bench_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `hf-deepseek bench train` (arguments defined in `hf_deepseek.cli`)."""
    words = ["hf-deepseek bench train"]
    for name, value in vars(args).items():
        if name in ("command", "bench_command") or value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        words.append(flag if value is True else f"{flag} {value}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return run_train_bench(plan_from_args(args), args.device, dtype, args.output_dir, command=" ".join(words))
