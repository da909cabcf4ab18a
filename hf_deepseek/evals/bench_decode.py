"""`hf-deepseek bench decode`: ms per decode step of transformers' DeepseekV3 and this model, same weights and shapes.

Rows, in one process: transformers eager (DynamicCache), transformers static cache + torch.compile (CUDA graphs),
ours eager (DynamicCache, absorbed decode), ours fast path (static latent cache + the compiled step `generate()`
uses, on CUDA captured in a CUDA graph by hand and replayed as `generate()`'s device loop replays it;
`ours-fast-trees`: in Inductor's CUDA graphs instead) in bf16 and with FP8 weights, ours with MTP self-speculative
decoding through `generate()`, and `generate()` end to end for both models (ms per new token, prefill subtracted;
ours with its device loop and with transformers' token loop, `ours-generate-tf-loop`). Each step-row cell
(batch, context) fills the cache with `context` random latent tokens (decode cost does not depend on their values,
and no row pays a long prefill), then times `warmup + steps` single-token steps with CUDA events between steps and
reports the median. The read floor of a step counts the weights a step must read (all but the embedding and the
MTP layer; routed experts in proportion to the expected number of distinct experts the batch selects under uniform
routing, E * (1 - (1 - k/E)^B) per MoE layer) plus the latent cache (B * context * (r + rope) values per layer), at
the copy bandwidth measured in the same run (and at the 4.8 TB/s datasheet figure).
"""

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
from transformers import DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation.configuration_utils import CompileConfig

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.evals.bench import (
    FULL_CONFIG,
    TINY_CONFIG,
    bench_setup,
    build_checkpoint,
    cache_kwargs,
    load,
    machine_description,
    synchronize,
)
from hf_deepseek.evals.bench_report import CPU_NOTE
from hf_deepseek.evals.cuda_graph_timing import ReplayedStep
from hf_deepseek.generation import fast_generate
from hf_deepseek.kernels import (
    flash_mla_decode,
    head_matmul,
    linear_rows,
    mla_chain,
    mla_decode_triton,
    mla_front,
    moe_gemv,
    moe_gemv_config,
    moe_grouped_gemv,
    moe_routing,
)
from hf_deepseek.kernels.moe_gemv_config import parse_config
from hf_deepseek.modeling import latent_cache, moe_decode
from hf_deepseek.modeling.latent_cache import LatentStaticCache
from hf_deepseek.modeling.moe import RoutedExperts

ROWS = (  # the table's order; rows run in the order asked (`run_order`)
    "transformers-eager",
    "transformers-compile",
    "transformers-generate",
    "ours-eager",
    "ours-fast",
    "ours-fast-grouped",
    "ours-fast-expert-grouped",
    "ours-fast-torch-attn",
    "ours-fast-triton-attn",
    "ours-fast-auto-attn",
    "ours-fast-cublas",
    "ours-fast-linear-rows",
    "ours-fast-gate-up",
    "ours-fast-head-matmul",
    "ours-fast-q-kv-a",
    "ours-fast-separate-q-kv-a",
    "ours-fast-norm-linear",
    "ours-fast-fold-shared",
    "ours-fast-unfolded",
    "ours-fast-all-kernels",
    "ours-fast-sum-top-k",
    "ours-mtp",
    "ours-generate",
    "ours-generate-trees",
    "ours-generate-tf-loop",
    "ours-fast-alt-linear",
    "ours-fast-fused-attn",
    "ours-fast-mla-front",
    "ours-fast-front-fused-attn",
    "ours-fast-launches-apart",
    "ours-fast-fewest-launches",
    "ours-fast-fewest-launches-pdl",
    "ours-fast-router-norm",
    "ours-fast-fewest-launches-router-norm",
    "ours-fast-mla-chain",
    "ours-fast-front-one-row",
    "ours-fast-input-norm",
    "ours-fast-separate-input-norm",
    "ours-fast-trees",
    "ours-fast-pdl",
    "ours-fast-fp8",
    "ours-fast-fp8-alt-linear",
    "ours-fast-fp8-pdl",
    "ours-fast-fp8-separate-q-kv-a",
    "ours-fast-fp8-mla-front",
    "ours-fast-fp8-fewest-launches",
    "ours-fast-fp8-launches-apart",
    "ours-generate-fp8",
    "ours-fast-fp8-head",
    "ours-generate-fp8-head",
    "ours-fast-fp8-head-input-norm",
    "ours-fast-fp8-head-separate-gate-up",
    "ours-fast-fused-experts",
    "ours-fast-fp8-head-fused-experts",
    "ours-prefill",
    "transformers-prefill",
)
# rows that time a batch of prompts into the cache alone (a 1-token generate(): no decode step, nothing compiled)
PREFILL_ROWS = ("ours-prefill", "transformers-prefill")
DATASHEET_TB_S = 4.8
# a CUDA step row whose host time a step is at least this fraction of its GPU time a step is noted host-bound: the
# GPU waited for the host's launches (Dynamo's guards, the CUDA-graph tree), so the figure is not its kernels'
HOST_BOUND = 0.9


@dataclass
class DecodePlan:
    config: dict[str, Any]
    batch_sizes: list[int]
    contexts: list[int]
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    steps: int = 10
    warmup_steps: int = 3
    mtp_contexts: list[int] = field(default_factory=lambda: [2048])
    mtp_new_tokens: int = 32
    # "random" tokens of each mtp_contexts length, "task": hfds_addition's held-out 3-digit sums in the checkpoint's
    # chat template, "auto": task prompts for a checkpoint with a chat template, random ones otherwise
    mtp_prompts: str = "auto"
    generate_new_tokens: int = 128  # the `*-generate` rows: greedy tokens per prompt, prefill subtracted
    compile_dynamic: bool | None = True  # one shape-generic graph per compiled row, CUDA graphs per shape
    row_batch_sizes: dict[str, list[int]] = field(default_factory=dict)  # per-row override of batch_sizes
    row_contexts: dict[str, list[int]] = field(default_factory=dict)  # per-row override of contexts
    profile: list[str] = field(default_factory=list)  # "row:batch:context" cells (step or generate rows) to profile


FULL_DECODE_PLAN = DecodePlan(FULL_CONFIG, batch_sizes=[1, 32], contexts=[2048, 8192, 32768])
TINY_DECODE_PLAN = DecodePlan(
    TINY_CONFIG, batch_sizes=[2], contexts=[16], steps=2, warmup_steps=1, mtp_contexts=[16], mtp_new_tokens=4,
    generate_new_tokens=6,
)  # fmt: skip


@dataclass
class DecodeCell:
    row: str
    batch: int
    context: int
    ms_per_step: float | None = None
    tokens_per_s: float | None = None
    peak_memory_gib: float | None = None
    floor_ms: float | None = None
    floor_fraction: float | None = None  # floor_ms / ms_per_step: 1.0 would read at the measured copy bandwidth
    acceptance_rate: float | None = None
    tokens_per_step: float | None = None
    plain_ms_per_token: float | None = None  # ours-mtp: plain greedy generate() on the same prompts, same run
    speedup_vs_plain: float | None = None  # ours-mtp: plain_ms_per_token / ms_per_step
    prefill_ms: float | None = None  # generate and prefill rows: a 1-token generate() call (the prompts into the cache)
    prefill_tokens_per_s: float | None = None  # generate and prefill rows: batch x context / prefill_ms
    host_ms_per_step: float | None = None  # step rows: the host's time a step (no sync between steps), median
    note: str = ""


# -- the read floor ---------------------------------------------------------------------------------------------
def step_weight_bytes(model: torch.nn.Module, batch: int) -> float:
    """Bytes of weights one decode step of `batch` tokens must read: every parameter and buffer of the main
    network but the embedding table (B rows) and the MTP layers; routed experts scaled by the expected fraction of
    distinct experts B tokens select (uniform routing)."""
    config = model.config
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    active = 1 - (1 - top_k / experts) ** batch
    mtp = tuple(f"model.layers.{config.num_hidden_layers + i}." for i in range(config.num_nextn_predict_layers))
    routed = {id(t) for m in model.modules() if isinstance(m, RoutedExperts) for t in m.parameters()}
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = 0.0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(mtp) or (tensor is embedding and embedding is not head):  # tied: read as lm_head
            continue
        nbytes = tensor.numel() * tensor.element_size()
        total += nbytes * active if id(tensor) in routed else nbytes
    return total


def cache_bytes(config, batch: int, context: int, element_size: int) -> int:
    return batch * context * (config.kv_lora_rank + config.qk_rope_head_dim) * element_size * config.num_hidden_layers


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float | None:
    """Bytes/s of a device-to-device copy (read + write counted), median of 5."""
    if device.type != "cuda":
        return None
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * int(gib * 2**30) / statistics.median(times[1:])


# -- caches filled with `context` random latent tokens ----------------------------------------------------------
def filled_cache(kind: str, model, batch: int, context: int, max_len: int, device, dtype):
    config = model.config
    if kind == "dynamic":
        cache = DynamicCache(config=config)
    elif kind == "static":
        cache = StaticCache(config=config, max_cache_len=max_len)
    else:
        cache = LatentStaticCache(config, max_cache_len=max_len)
        cache.unpadded = True  # random tokens, no padding: FlashMLA's decode kernel may read it
    gen = torch.Generator(device=device).manual_seed(batch * 7919 + context)
    latent = torch.randn(batch, 1, context, config.kv_lora_rank, device=device, dtype=dtype, generator=gen)
    rope = torch.randn(batch, 1, context, config.qk_rope_head_dim, device=device, dtype=dtype, generator=gen)
    for layer in range(config.num_hidden_layers):
        cache.update(latent, rope, layer)
    return cache


def time_steps(
    step: Callable, model, cache, batch: int, context: int, plan: DecodePlan, device, host_ms: list | None = None
) -> list[float]:
    """Feed `warmup + steps` single tokens through `step`; ms between consecutive steps (CUDA events on CUDA).
    `host_ms`, if given, receives the host's ms between the same marks (no synchronisation in between): where it
    matches the events' figure the GPU was waiting for the host, not the other way round."""
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (plan.warmup_steps + plan.steps, batch, 1), device=device)
    kwargs = cache_kwargs(model, cache)
    marks, host = [], []
    for i in range(plan.warmup_steps + plan.steps):
        if i >= plan.warmup_steps:
            marks.append(_mark(device))
            host.append(time.perf_counter())
        position = torch.full((batch, 1), context + i, device=device, dtype=torch.long)
        step(input_ids=tokens[i], position_ids=position, use_cache=True, logits_to_keep=1, **kwargs)
    marks.append(_mark(device))
    host.append(time.perf_counter())
    if host_ms is not None:
        host_ms.extend(1000 * (b - a) for a, b in zip(host, host[1:], strict=False))
    synchronize(device)
    if device.type == "cuda":
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
    return [1000 * (b - a) for a, b in zip(marks, marks[1:], strict=False)]


def profile_steps(step: Callable, model, cache, batch: int, context: int, plan: DecodePlan, device, path: Path):
    """Where a decode step's time goes: `plan.steps` more steps (the cache already holds `context` tokens) under
    torch's profiler, kernels launched from CUDA graphs included; torch's table by device time, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timing = replace(plan, warmup_steps=0)
    with profile(activities=activities) as prof:
        time_steps(step, model, cache, batch, context, timing, device)
    write_profile(prof, device, path, f"{plan.steps} decode steps, batch {batch}, context {context}")


def write_profile(prof, device, path: Path, header: str) -> None:
    """torch profiler's table of `prof` by device time (CPU time on the CPU), its 40 first rows, under `header`."""
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=100)
    path.write_text(f"{header}\n{table}")


def _mark(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


# -- rows -------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    cache_kind: str  # dynamic | static | latent
    compiled: bool
    dense_decode_experts: bool = True  # moe_decode.DENSE_DECODE and moe_gemv.ENABLED during the row
    flash_mla: bool = True  # flash_mla_decode.ENABLED during the row (FlashMLA where installed)
    decode_attention: str | None = None  # latent_cache.DECODE_ATTENTION during the row (None: the environment's)
    linear_gemv: bool = True  # moe_gemv.LINEAR_GEMV during the row (bf16 dense layers' decode row through the kernel)
    sum_top_k: bool | None = None  # moe_gemv.SUM_TOP_K during the row (None: the environment's)
    expert_grouped: bool = False  # moe_grouped_gemv.GROUPED_GEMV on (bf16 experts through the grouped kernels)
    linear_rows: bool = False  # linear_rows.BF16 on (bf16 dense layers' 2-64 decode rows through the rows kernel)
    # moe_gemv.FUSED_GATE_UP during the row (a SwiGLU MLP's gate and up of one row in one launch);
    # None: the environment's (on by default)
    fused_gate_up: bool | None = None
    head_matmul: bool = False  # head_matmul.ENABLED on (W_UK and W_UV of the decode rows through the Triton kernel)
    # moe_gemv.FUSED_Q_KV_A (MLA's q_a and kv_a projections of one row in one launch) during the row (None: the
    # environment's)
    fused_q_kv_a: bool | None = None
    # moe_gemv.FUSED_NORM_LINEAR during the row (MLA's q_a norm in the q_b projection's launch);
    # None: the environment's (on by default)
    fused_norm_linear: bool | None = None
    fold_shared: bool | None = None  # moe_gemv.FOLD_SHARED (the shared MLP as more pairs of the routed experts'
    # launches) during the row (None: the environment's)
    alt_linear: bool = False  # the dense layers' matrix-vector kernels at the ALT_LINEAR_ENV configurations
    # mla_decode_triton.FUSED during the row (the roped query apart, W_UV in the combine kernel);
    # None: the environment's (on by default)
    fused_attention: bool | None = None
    # mla_front.ENABLED during the row (kv norm, RoPE, cache write and W_UK of a step in one launch);
    # None: the environment's (on by default)
    mla_front: bool | None = None
    # moe_routing.ADD_NORM during the row (the residual sum and post-attention norm in the router);
    # None: the environment's (on by default)
    router_add_norm: bool | None = None
    mla_chain: bool = False  # mla_chain.ENABLED on (a batch-1 row's q_a, kv_a, q_b and MLA front in one launch)
    # mla_front.MAX_ROWS during the row (None: the environment's, every decode batch by default)
    mla_front_rows: int | None = None
    # moe_gemv.FUSED_INPUT_NORM during the row (a layer's input norm in its q_a/kv_a launch); None: the environment's
    fused_input_norm: bool | None = None
    # moe_gemv.FUSED_EXPERTS during the row (a MoE layer's two matrix-vector launches as one); None: the environment's
    fused_experts: bool | None = None
    # CUDA: the compiled step in Inductor's CUDA graphs (mode "reduce-overhead", a step a call behind Dynamo's guards)
    # instead of compiled without them, captured by hand and replayed, as generate()'s device loop runs it
    inductor_graphs: bool = False
    # programmatic dependent launch (Hopper: a kernel's launch, and its weight reads into L2, overlap the kernel
    # before it) for our decode kernels (moe_gemv_config.PDL) and Inductor's (its config.triton.enable_pdl)
    pdl: bool = False


# the switches of every kernel that takes launches out of a batch-1 layer (the `*-fewest-launches` rows; on by
# default since 2026-12-06, off in the `*-launches-apart` rows)
FEWEST_LAUNCHES = dict(
    mla_front=True, fused_attention=True, fused_norm_linear=True, fused_gate_up=True, fused_input_norm=True
)
LAUNCHES_APART = {switch: False for switch in FEWEST_LAUNCHES} | dict(router_add_norm=False)
STEP_ROWS = {
    "transformers-eager": Row("transformers-eager", "dynamic", False),
    "transformers-compile": Row("transformers-compile", "static", True),
    "ours-eager": Row("ours-eager", "dynamic", False),
    "ours-fast": Row("ours-fast", "latent", True),
    "ours-fast-grouped": Row("ours-fast-grouped", "latent", True, dense_decode_experts=False),
    "ours-fast-torch-attn": Row("ours-fast-torch-attn", "latent", True, flash_mla=False),
    "ours-fast-triton-attn": Row("ours-fast-triton-attn", "latent", True, decode_attention="triton"),
    "ours-fast-auto-attn": Row("ours-fast-auto-attn", "latent", True, decode_attention="auto"),
    "ours-fast-cublas": Row("ours-fast-cublas", "latent", True, linear_gemv=False),
    "ours-fast-sum-top-k": Row("ours-fast-sum-top-k", "latent", True, sum_top_k=True),
    "ours-fast-expert-grouped": Row("ours-fast-expert-grouped", "latent", True, expert_grouped=True),
    "ours-fast-linear-rows": Row("ours-fast-linear-rows", "latent", True, linear_rows=True),
    "ours-fast-gate-up": Row("ours-fast-gate-up", "latent", True, fused_gate_up=True),
    "ours-fast-head-matmul": Row("ours-fast-head-matmul", "latent", True, head_matmul=True),
    "ours-fast-q-kv-a": Row("ours-fast-q-kv-a", "latent", True, fused_q_kv_a=True),
    "ours-fast-separate-q-kv-a": Row("ours-fast-separate-q-kv-a", "latent", True, fused_q_kv_a=False),
    "ours-fast-norm-linear": Row("ours-fast-norm-linear", "latent", True, fused_norm_linear=True),
    "ours-fast-fold-shared": Row("ours-fast-fold-shared", "latent", True, fold_shared=True),
    "ours-fast-unfolded": Row("ours-fast-unfolded", "latent", True, fold_shared=False),
    "ours-fast-all-kernels": Row(  # every opt-in decode kernel at once
        "ours-fast-all-kernels",
        "latent",
        True,
        decode_attention="auto",
        expert_grouped=True,
        linear_rows=True,
        fused_gate_up=True,
        head_matmul=True,
        fused_q_kv_a=True,
        fused_norm_linear=True,
        fold_shared=True,
    ),
    "ours-fast-alt-linear": Row("ours-fast-alt-linear", "latent", True, alt_linear=True),
    "ours-fast-fused-attn": Row("ours-fast-fused-attn", "latent", True, fused_attention=True),
    "ours-fast-mla-front": Row("ours-fast-mla-front", "latent", True, mla_front=True),
    "ours-fast-front-fused-attn": Row(
        "ours-fast-front-fused-attn", "latent", True, mla_front=True, fused_attention=True
    ),
    "ours-fast-launches-apart": Row(  # the default before 2026-12-06: none of the launch-saving kernels
        "ours-fast-launches-apart", "latent", True, **LAUNCHES_APART
    ),
    "ours-fast-fewest-launches": Row(  # every kernel that takes launches out of a batch-1 layer but the router's
        "ours-fast-fewest-launches", "latent", True, **FEWEST_LAUNCHES, router_add_norm=False
    ),
    "ours-fast-fewest-launches-pdl": Row(  # and programmatic dependent launch, now that the chain is mostly ours
        "ours-fast-fewest-launches-pdl", "latent", True, **FEWEST_LAUNCHES, pdl=True
    ),
    "ours-fast-router-norm": Row("ours-fast-router-norm", "latent", True, router_add_norm=True),
    "ours-fast-fewest-launches-router-norm": Row(  # and the post-attention residual sum and norm in the router's launch
        "ours-fast-fewest-launches-router-norm", "latent", True, **FEWEST_LAUNCHES, router_add_norm=True
    ),
    "ours-fast-mla-chain": Row("ours-fast-mla-chain", "latent", True, mla_chain=True),
    # the MLA front at one decode row only (the default until 2026-12-06; at every batch since)
    "ours-fast-front-one-row": Row("ours-fast-front-one-row", "latent", True, mla_front_rows=1),
    "ours-fast-trees": Row("ours-fast-trees", "latent", True, inductor_graphs=True),
    # a layer's input norm in its q_a/kv_a launch (the default since 2026-12-06), and apart, as before
    "ours-fast-input-norm": Row("ours-fast-input-norm", "latent", True, fused_input_norm=True),
    "ours-fast-separate-input-norm": Row("ours-fast-separate-input-norm", "latent", True, fused_input_norm=False),
    "ours-fast-pdl": Row("ours-fast-pdl", "latent", True, pdl=True),
    "ours-fast-fp8": Row("ours-fast-fp8", "latent", True),
    "ours-fast-fp8-alt-linear": Row("ours-fast-fp8-alt-linear", "latent", True, alt_linear=True),
    "ours-fast-fp8-pdl": Row("ours-fast-fp8-pdl", "latent", True, pdl=True),
    "ours-fast-fp8-separate-q-kv-a": Row("ours-fast-fp8-separate-q-kv-a", "latent", True, fused_q_kv_a=False),
    "ours-fast-fp8-mla-front": Row("ours-fast-fp8-mla-front", "latent", True, mla_front=True),
    "ours-fast-fp8-fewest-launches": Row("ours-fast-fp8-fewest-launches", "latent", True, **FEWEST_LAUNCHES),
    "ours-fast-fp8-launches-apart": Row("ours-fast-fp8-launches-apart", "latent", True, **LAUNCHES_APART),
    "ours-fast-fp8-head": Row("ours-fast-fp8-head", "latent", True),
    "ours-fast-fp8-head-input-norm": Row("ours-fast-fp8-head-input-norm", "latent", True, fused_input_norm=True),
    # the dense MLP's FP8 gate and up as two launches and an activation kernel (the default until 2026-12-06)
    "ours-fast-fp8-head-separate-gate-up": Row(
        "ours-fast-fp8-head-separate-gate-up", "latent", True, fused_gate_up=False
    ),
    # a MoE layer's gate/up and down kernels in one launch of persistent programs (opt-in)
    "ours-fast-fused-experts": Row("ours-fast-fused-experts", "latent", True, fused_experts=True),
    "ours-fast-fp8-head-fused-experts": Row("ours-fast-fp8-head-fused-experts", "latent", True, fused_experts=True),
}
# run last: the first converts our model in place
FP8_ROWS = (
    "ours-fast-fp8", "ours-fast-fp8-alt-linear", "ours-fast-fp8-pdl", "ours-fast-fp8-separate-q-kv-a",
    "ours-fast-fp8-mla-front", "ours-fast-fp8-fewest-launches", "ours-fast-fp8-launches-apart", "ours-generate-fp8",
)  # fmt: skip
# run after those: they also quantise the LM head (which DeepSeek's FP8 checkpoints and `FP8Recipe` keep in bf16)
FP8_HEAD_ROWS = (
    "ours-fast-fp8-head",
    "ours-generate-fp8-head",
    "ours-fast-fp8-head-input-norm",
    "ours-fast-fp8-head-separate-gate-up",
    "ours-fast-fp8-head-fused-experts",
)
# the `*-alt-linear` rows' launch configurations of the dense layers' matrix-vector kernels, bf16 and FP8 weights
# ("BLOCK_N,BLOCK_K,WARPS[,SPLIT_K[,STAGES]]"; unset: the row takes the default), to time one against the default
# in one run (benchmarks/decode_h200.sh sets them to `moe_gemv_tune.py --linear`'s choice)
ALT_LINEAR_ENV = ("HF_DEEPSEEK_ALT_LINEAR_GEMV_CONFIG", "HF_DEEPSEEK_ALT_LINEAR_GEMV_FP8_CONFIG")


def compiled_step(model, plan: DecodePlan, mode: str | None = None) -> Callable:
    """The compiled forward `generate()` uses for a compileable cache (`get_compiled_call`), fresh per model, after
    one eager forward (generate's prefill), which lets one-time probes (FP8 GEMM dispatch) run outside the graph.
    `mode`: torch.compile's, instead of generate's ("reduce-overhead": Inductor's CUDA graphs)."""
    torch.compiler.reset()
    model.__dict__.pop("_compiled_call", None)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=model.device), use_cache=False)
    # our FP8 weights compile one graph per shape, as generate compiles them (transformers' peer has none)
    fp8 = isinstance(model, DeepSeekForCausalLM) and model.has_fp8_weights()
    dynamic = False if fp8 else plan.compile_dynamic
    return model.get_compiled_call(CompileConfig(dynamic=dynamic, **({} if mode is None else {"mode": mode})))


def floor_model(config: DeepSeekConfig, dtype: torch.dtype) -> DeepSeekForCausalLM:
    """Our model at the benchmark's shapes on the meta device: what the read floor counts, for every row alike
    (the bytes a step must read in `dtype`, whichever implementation reads them)."""
    with torch.device("meta"):
        return DeepSeekForCausalLM._from_config(config, dtype=dtype)


@contextmanager
def row_switches(row: Row):
    """The kernel switches `row` measures (each on a model-wide module flag), restored afterwards. A switch turned
    off for the whole run by its environment variable (HF_DEEPSEEK_FLASH_MLA=0, HF_DEEPSEEK_LINEAR_GEMV=0) stays off."""
    switches = [  # (module, attribute, value during the row)
        (moe_decode, "DENSE_DECODE", row.dense_decode_experts),  # ours-fast-grouped: grouped GEMM always
        (moe_gemv, "ENABLED", row.dense_decode_experts),
        (flash_mla_decode, "ENABLED", flash_mla_decode.ENABLED and row.flash_mla),
        (latent_cache, "DECODE_ATTENTION", row.decode_attention or latent_cache.DECODE_ATTENTION),
        (moe_gemv, "LINEAR_GEMV", moe_gemv.LINEAR_GEMV and row.linear_gemv),
        (moe_gemv, "SUM_TOP_K", moe_gemv.SUM_TOP_K if row.sum_top_k is None else row.sum_top_k),
        (moe_grouped_gemv, "GROUPED_GEMV", row.expert_grouped or moe_grouped_gemv.GROUPED_GEMV),
        (linear_rows, "BF16", row.linear_rows or linear_rows.BF16),
        (moe_gemv, "FUSED_GATE_UP", moe_gemv.FUSED_GATE_UP if row.fused_gate_up is None else row.fused_gate_up),
        (head_matmul, "ENABLED", row.head_matmul or head_matmul.ENABLED),
        (moe_gemv, "FUSED_Q_KV_A", moe_gemv.FUSED_Q_KV_A if row.fused_q_kv_a is None else row.fused_q_kv_a),
        (
            moe_gemv,
            "FUSED_NORM_LINEAR",
            moe_gemv.FUSED_NORM_LINEAR if row.fused_norm_linear is None else row.fused_norm_linear,
        ),
        (moe_gemv, "FOLD_SHARED", moe_gemv.FOLD_SHARED if row.fold_shared is None else row.fold_shared),
        (mla_decode_triton, "FUSED", mla_decode_triton.FUSED if row.fused_attention is None else row.fused_attention),
        (mla_front, "ENABLED", mla_front.ENABLED if row.mla_front is None else row.mla_front),
        (moe_routing, "ADD_NORM", moe_routing.ADD_NORM if row.router_add_norm is None else row.router_add_norm),
        (mla_chain, "ENABLED", row.mla_chain or mla_chain.ENABLED),
        (mla_front, "MAX_ROWS", mla_front.MAX_ROWS if row.mla_front_rows is None else row.mla_front_rows),
        (
            moe_gemv,
            "FUSED_INPUT_NORM",
            moe_gemv.FUSED_INPUT_NORM if row.fused_input_norm is None else row.fused_input_norm,
        ),
        (moe_gemv, "FUSED_EXPERTS", moe_gemv.FUSED_EXPERTS if row.fused_experts is None else row.fused_experts),
    ]
    if row.pdl:
        switches.append((moe_gemv_config, "PDL", True))
        inductor = torch._inductor.config.triton
        if hasattr(inductor, "enable_pdl"):  # read when the row compiles its step, under these switches
            switches.append((inductor, "enable_pdl", True))
    if row.alt_linear:
        bf16, fp8 = (parse_config(os.environ.get(name)) for name in ALT_LINEAR_ENV)
        switches += [
            (moe_gemv_config, "LINEAR_CONFIG", bf16 or moe_gemv_config.LINEAR_CONFIG),
            (moe_gemv_config, "LINEAR_FP8_CONFIG", fp8 or moe_gemv_config.LINEAR_FP8_CONFIG),
        ]
    with patched_attributes(switches):
        yield


@contextmanager
def patched_attributes(settings: list[tuple]):
    """Each (module, attribute, value) of `settings` set for the block, the previous values restored after it."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in settings]
    for module, name, value in settings:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def cudagraph_skips() -> int:
    """How many compiled graphs Inductor has run without CUDA graphs so far in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def run_step_row(
    row: Row,
    model,
    plan: DecodePlan,
    device,
    dtype,
    bandwidth,
    progress,
    floor: DeepSeekForCausalLM,
    emit=None,
    output_dir: Path | None = None,
) -> list[DecodeCell]:
    with row_switches(row):
        return _measure_step_row(row, model, plan, device, dtype, bandwidth, progress, floor, emit, output_dir)


def _measure_step_row(row, model, plan, device, dtype, bandwidth, progress, floor, emit, output_dir):
    """`run_step_row`'s cells, measured under the row's switches."""
    cells = []
    compile_here = row.compiled and device.type == "cuda"  # generate compiles only on accelerators
    # our compiled rows: without Inductor's CUDA graphs, the step captured by hand once a cell and replayed
    replay = compile_here and row.cache_kind == "latent" and not row.inductor_graphs
    step = compiled_step(model, plan, "default" if replay else None) if compile_here else model.__call__
    floor_cache_size = torch.empty((), dtype=dtype).element_size()
    for batch in plan.row_batch_sizes.get(row.name, plan.batch_sizes):
        weights = step_weight_bytes(floor, batch)
        for context in plan.row_contexts.get(row.name, plan.contexts):
            cell = DecodeCell(row.name, batch, context)
            if row.compiled and not compile_here:
                cell.note = "not compiled on CPU (as generate)"
            started = time.perf_counter()
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                profiled = f"{row.name}:{batch}:{context}" in plan.profile
                max_len = context + (2 if profiled else 1) * (plan.warmup_steps + plan.steps)
                skips_before = cudagraph_skips()
                with torch.no_grad():
                    cache = filled_cache(row.cache_kind, model, batch, context, max_len, device, dtype)
                    host_ms: list[float] = []
                    cell_step = step
                    if replay:  # the capture's warm-up token taken back out
                        cell_step = ReplayedStep(step, rewind=lambda c=cache, n=context: c.set_length(n))
                    times = time_steps(cell_step, model, cache, batch, context, plan, device, host_ms)
                    if profiled and output_dir is not None:
                        path = output_dir / f"profile_{row.name}_b{batch}_c{context}.txt"
                        offset = plan.warmup_steps + plan.steps
                        profile_steps(cell_step, model, cache, batch, context + offset, plan, device, path)
                if compile_here and cudagraph_skips() > skips_before:  # the step ran launch by launch
                    cell.note = "CUDA graphs skipped (TORCH_LOGS=perf_hints prints why)"
                cell.ms_per_step = statistics.median(times)
                cell.host_ms_per_step = statistics.median(host_ms)
                if device.type == "cuda" and cell.host_ms_per_step >= HOST_BOUND * cell.ms_per_step:
                    bound = f"host-bound: the host took {cell.host_ms_per_step:.2f} ms a step"
                    cell.note = f"{cell.note}; {bound}" if cell.note else bound
                cell.tokens_per_s = batch * 1000 / cell.ms_per_step
                if device.type == "cuda":
                    cell.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
                floor_bytes = weights + cache_bytes(model.config, batch, context, floor_cache_size)
                if bandwidth:
                    cell.floor_ms = 1000 * floor_bytes / bandwidth
                    cell.floor_fraction = cell.floor_ms / cell.ms_per_step
            except torch.OutOfMemoryError:
                cell.note = "out of memory"
            except Exception as error:  # a row that fails to compile or run is reported, the others still run
                cell.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            finally:
                cache = None
                gc.collect()
            progress(
                f"{row.name} batch {batch} context {context}: "
                + (f"{cell.ms_per_step:.2f} ms/step" if cell.ms_per_step else cell.note)
                + f" ({time.perf_counter() - started:.0f} s)"
            )
            cells.append(cell)
            if emit is not None:  # each cell reported as it is measured
                emit(cell)
    if compile_here:
        torch.compiler.reset()
        model.__dict__.pop("_compiled_call", None)
    return cells


def time_generate(model, ids: torch.Tensor, new_tokens: int, device, **kwargs) -> float:
    """Seconds of one greedy `generate` of exactly `new_tokens` tokens per row (eos cannot end it early)."""
    synchronize(device)
    start = time.perf_counter()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **kwargs,
    )  # fmt: skip
    synchronize(device)
    return time.perf_counter() - start


GENERATE_REPEATS = 3  # timed generate() calls per measurement (the median), unless one call takes over REPEAT_BELOW_S
REPEAT_BELOW_S = 5.0


def median_generate_s(model, ids: torch.Tensor, new_tokens: int, device, **kwargs) -> float:
    """The median seconds of `GENERATE_REPEATS` `time_generate` calls (one where a call takes over REPEAT_BELOW_S)."""
    times = [time_generate(model, ids, new_tokens, device, **kwargs)]
    while times[0] < REPEAT_BELOW_S and len(times) < GENERATE_REPEATS:
        times.append(time_generate(model, ids, new_tokens, device, **kwargs))
    return statistics.median(times)


def profile_generate(model, ids: torch.Tensor, new_tokens: int, device, kwargs: dict, path: Path) -> None:
    """Where a generate() call's time goes: one call of `new_tokens` tokens (prefill included) under torch's
    profiler, kernels launched from CUDA graphs included."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_generate(model, ids, new_tokens, device, **kwargs)
    batch, context = ids.shape
    write_profile(prof, device, path, f"one generate() of {new_tokens} new tokens, batch {batch}, context {context}")


def run_generate_row(
    name: str, model, plan: DecodePlan, device, floor, bandwidth, progress, emit=None, output_dir: Path | None = None
) -> list[DecodeCell]:
    """`generate()` end to end as users call it (greedy; ours: its default fast path; transformers': its static
    cache, which it compiles on accelerators), with the step rows' compile settings (`plan.compile_dynamic`): ms per
    new token with the prefill subtracted (medians of `GENERATE_REPEATS` calls each), after a warm-up call that
    compiles. The same read floor as the step rows. A cell named in `plan.profile` also gets a kernel table of one
    call (`profile_generate`)."""
    kwargs = {"cache_implementation": "static"} if name.startswith("transformers") else {}
    if name == "ours-generate-tf-loop":
        kwargs = {"fast_loop": False}  # the static latent cache and compiled step, transformers' token loop
    fp8 = isinstance(model, DeepSeekForCausalLM) and model.has_fp8_weights()
    # compiled as the step rows are (one shape-generic graph: one compile for every cell, CUDA graphs per shape)
    kwargs["compile_config"] = CompileConfig(dynamic=False if fp8 else plan.compile_dynamic)
    # ours-generate-trees: the device loop with Inductor's CUDA graphs, a step a call, instead of its own graphs
    hand_graphs = fast_generate.HAND_GRAPHS and name != "ours-generate-trees"
    with patched_attributes([(fast_generate, "HAND_GRAPHS", hand_graphs)]):
        return _measure_generate_row(name, model, plan, device, floor, bandwidth, progress, emit, output_dir, kwargs)


def _measure_generate_row(
    name, model, plan, device, floor, bandwidth, progress, emit, output_dir, kwargs, new_tokens: int | None = None
):
    """`run_generate_row`'s cells, with its generate() arguments `kwargs`; `new_tokens` 1: the prefill alone (no ms
    per new token, no floor: `run_prefill_row`)."""
    floor_cache_size = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    n = new_tokens or plan.generate_new_tokens
    cells = []
    for batch in plan.row_batch_sizes.get(name, plan.batch_sizes):
        for context in plan.row_contexts.get(name, plan.contexts):
            cell = DecodeCell(name, batch, context)
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
                time_generate(model, ids, n, device, **kwargs)  # warm-up: compilation, CUDA graphs
                prefill_s = median_generate_s(model, ids, 1, device, **kwargs)
                if n > 1:
                    total_s = median_generate_s(model, ids, n, device, **kwargs)
                    cell.ms_per_step = 1000 * (total_s - prefill_s) / (n - 1)
                    cell.tokens_per_s = batch * 1000 / cell.ms_per_step
                    floor_bytes = step_weight_bytes(floor, batch) + cache_bytes(
                        model.config, batch, context, floor_cache_size
                    )
                    cell.floor_ms = 1000 * floor_bytes / bandwidth
                    cell.floor_fraction = cell.floor_ms / cell.ms_per_step
                if device.type == "cuda":
                    cell.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
                cell.prefill_ms = 1000 * prefill_s
                cell.prefill_tokens_per_s = batch * context / prefill_s
                cell.note = f"prefill {cell.prefill_ms:.1f} ms"
                if model.__dict__.get("fast_loop_error"):  # generate() fell back to transformers' loop
                    cell.note += f"; device loop failed, transformers' loop measured: {model.fast_loop_error[:150]}"
                if output_dir is not None and f"{name}:{batch}:{context}" in plan.profile:
                    path = output_dir / f"profile_{name}_b{batch}_c{context}.txt"
                    profile_generate(model, ids, n, device, kwargs, path)
            except torch.OutOfMemoryError:
                cell.note = "out of memory"
            except Exception as error:  # a row that fails is reported, the others still run
                cell.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if n > 1:
                speed = "-" if cell.ms_per_step is None else f"{cell.ms_per_step:.3f} ms/token"
            else:
                speed = "-" if cell.prefill_tokens_per_s is None else f"{cell.prefill_tokens_per_s:,.0f} tokens/s"
            progress(f"{name} batch {batch} context {context}: {speed} {cell.note}")
            cells.append(cell)
            if emit is not None:  # each cell reported as it is measured
                emit(cell)
    model.__dict__.pop("_fast_decode_buffers", None)  # the device loop's cache: free it for the next rows
    return cells


def run_prefill_row(name: str, model, plan: DecodePlan, device, progress, emit=None) -> list[DecodeCell]:
    """Prompts into the cache as `generate()` starts, alone: a 1-token `generate()` (no decode step, so nothing
    compiles: the *-generate rows' prefill waits for their decode step's compile, which took transformers' over
    190 s at 32 x 8k on an H200), medians of `GENERATE_REPEATS` calls after a warm-up call. Transformers' with its
    static cache, ours by its default path (whole prompts in groups, long ones in chunks, straight into the latent
    cache). Prompt tokens a second and peak memory; an out-of-memory cell is noted, and the next cell runs."""
    kwargs = {"cache_implementation": "static"} if name.startswith("transformers") else {}
    return _measure_generate_row(name, model, plan, device, None, None, progress, emit, None, kwargs, new_tokens=1)


MTP_PROMPT_KINDS = ("auto", "random", "task")
MTP_REPEATS = 3  # timed calls per MTP-row measurement (the median)
# two tokens whose logits differ by at most this much (teacher-forced, bench dtype) count as a near-tie: bf16's own
# error in the gap between a position's two best logits, against fp32 (hf-deepseek-r1-add-sub, 1,024 generated
# positions, CPU): median 0.05, 90th percentile 0.25, 99th 1.16
NEAR_TIE_LOGITS = 1.0
FP32_CHECK_PARAMETERS = 10**9  # the fp32 re-run of a differing MTP cell: only for models up to this size


def resolved_mtp_prompts(model, plan: DecodePlan) -> str:
    """`plan.mtp_prompts`, with "auto" resolved: the task's prompts for a checkpoint that has a chat template (a
    trained model: acceptance on the questions it was trained on means something), random tokens otherwise."""
    if plan.mtp_prompts not in MTP_PROMPT_KINDS:
        raise ValueError(f"mtp_prompts must be one of {', '.join(MTP_PROMPT_KINDS)}, not {plan.mtp_prompts!r}")
    if plan.mtp_prompts != "auto":
        return plan.mtp_prompts
    source = Path(str(model.name_or_path))
    return "task" if (source / "chat_template.jinja").exists() and (source / "tokenizer.json").exists() else "random"


def mtp_prompts(model, plan: DecodePlan, batch: int, context: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, T] prompt ids and their attention mask: random tokens of length `context`, or with task prompts
    (`resolved_mtp_prompts`) the held-out 3-digit sums of `hfds_addition` in the chat template (the tokenizer
    loaded from the model's checkpoint), left-padded."""
    if resolved_mtp_prompts(model, plan) == "random":
        ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
        return ids, torch.ones_like(ids)
    from transformers import AutoTokenizer

    from hf_deepseek.evals.task_data import load_rows, prompt_text

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    rows = load_rows("addition")["test"]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(rows[i % len(rows)])}], add_generation_prompt=True,
            return_dict=True,
        )["input_ids"]
        for i in range(batch)
    ]  # fmt: skip
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def token_differences(model, reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """Where greedy outputs [B, T + new] of the same prompts (left-padded by `mask` [B, T]) first differ, row by
    row: the new-token index, both tokens, and how far apart their logits are there in a teacher-forced forward of
    the common prefix (the model's dtype): a gap near 0 is a near-tie that rounding decides."""
    prompt_len = mask.shape[1]
    differences = []
    for row in range(reference.shape[0]):
        differ = (reference[row, prompt_len:] != other[row, prompt_len:]).nonzero()
        if not len(differ):
            continue
        index = int(differ[0])
        start = int((mask[row] == 0).sum())  # left padding: dropped, the positions then start at 0 as in generate()
        prefix = reference[row, start : prompt_len + index]
        logits = model(input_ids=prefix[None]).logits[0, -1].float()
        first, second = int(reference[row, prompt_len + index]), int(other[row, prompt_len + index])
        gap = abs(float(logits[first] - logits[second]))
        differences.append({"row": row, "new_token": index, "tokens": (first, second), "logit_gap": gap})
    return differences


def differences_note(differences: list[dict], batch: int) -> str:
    """`token_differences` in words: which rows, from which new token, the logit gaps and whether all are near-ties."""
    gaps = [d["logit_gap"] for d in differences]
    near = all(g <= NEAR_TIE_LOGITS for g in gaps)
    where = ", ".join(f"row {d['row']} at new token {d['new_token']} ({d['logit_gap']:.3f})" for d in differences)
    verdict = "all near-ties" if near else f"not all near-ties (> {NEAR_TIE_LOGITS})"
    return (
        f"differs in {len(differences)}/{batch} rows; first differences and the teacher-forced logit gap of the two "
        f"tokens there: {where}: {verdict}"
    )


def fp32_equality(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, device) -> str:
    """Whether the MTP device loop and plain greedy decoding give the same tokens in fp32 (uncompiled device loops,
    the model reloaded from its checkpoint): rounding differences of the bench dtype then stay well below the
    margins greedy decoding picks between."""
    if model.dtype == torch.float32:
        return ""
    if model.num_parameters() > FP32_CHECK_PARAMETERS:
        return "; no fp32 re-run (model too large)"
    try:
        reference = load(DeepSeekForCausalLM, model.name_or_path, device, torch.float32)
        common = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                      eos_token_id=None, fast_loop=True, disable_compile=True)  # fmt: skip
        plain = reference.generate(ids, **common)
        mtp = reference.generate(ids, mtp_speculative=True, mtp_draft_tokens=1, **common)
        equal = torch.equal(plain, mtp)
        differences = ""
        if not equal:
            differences = f" ({differences_note(token_differences(reference, plain, mtp, mask), len(mask))})"
        del reference
        verdict = " (the differences above are the bench dtype's rounding)" if equal else differences
        return f"; in fp32 (uncompiled device loops) equal to plain greedy: {equal}{verdict}"
    except Exception as error:  # a diagnostic: its failure must not lose the cell
        return f"; fp32 re-run failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


def run_mtp_row(model, plan: DecodePlan, device, progress, emit=None) -> list[DecodeCell]:
    """MTP self-speculative greedy decoding through `generate(mtp_speculative=True, fast_loop=True)` (the device
    loop, one draft per step: one compiled verify-and-draft step on CUDA, uncompiled on a CPU) against plain greedy
    `generate()` (its fast path where it applies), the eager speculative loop and transformers' loop over a dynamic
    cache, on the same prompts in the same run: ms per generated token (prefill subtracted, after a warm-up call
    that compiles; the median of `MTP_REPEATS` timed calls), acceptance, tokens per step, and whether the tokens
    equal plain greedy decoding's (where they differ: where, by how much, and whether fp32 agrees).

    Every timed call generates exactly `plan.mtp_new_tokens` tokens per row: end-of-sequence is switched off
    (`eos_token_id=None`, which generate(), its device loop and both speculative loops honour), else a trained model
    that ends its answer early would leave a time per token of a handful of tokens, or of one. With task prompts
    the note also gives the acceptance up to each answer's end-of-sequence token (an untimed call with eos on)."""
    cells = []
    prompts = resolved_mtp_prompts(model, plan)
    contexts = plan.mtp_contexts if prompts == "random" else [0]
    n = plan.mtp_new_tokens
    for batch in plan.row_batch_sizes.get("ours-mtp", plan.batch_sizes):
        for context in contexts:
            cell = DecodeCell("ours-mtp", batch, context)
            try:
                if n < 2:
                    raise ValueError(f"--mtp-new-tokens {n}: at least 2 new tokens are needed to subtract the prefill")
                ids, mask = mtp_prompts(model, plan, batch, context, device)
                cell.context = ids.shape[1]
                # eos_token_id=None: every call generates exactly n tokens per row, whatever the model emits
                common = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)

                def run(new_tokens: int, ids=ids, common=common, **extra):
                    synchronize(device)
                    start = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=new_tokens, **common, **extra)
                    synchronize(device)
                    return time.perf_counter() - start, out

                def ms_per_token(ids=ids, **extra) -> tuple[float | None, torch.Tensor]:
                    """ms per token after the first, or None where the difference is not a time (noise)."""
                    run(n, **extra)  # warm-up: compilation, CUDA graphs
                    prefill_s = statistics.median(run(1, **extra)[0] for _ in range(MTP_REPEATS))
                    timed = [run(n, **extra) for _ in range(MTP_REPEATS)]
                    out = timed[-1][1]
                    if out.shape[1] - ids.shape[1] != n:
                        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens per row, not {n}")
                    ms = 1000 * (statistics.median(t for t, _ in timed) - prefill_s) / (n - 1)
                    return (ms if ms > 0 else None), out

                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                mtp_ms, out = ms_per_token(mtp_speculative=True, fast_loop=True, mtp_draft_tokens=1)
                stats = dict(model.last_speculative_stats or {})
                if device.type == "cuda":
                    cell.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
                plain_ms, plain_out = ms_per_token()
                eager_mtp_ms, eager_out = ms_per_token(mtp_speculative=True, fast_loop=False)
                dynamic_ms, _ = ms_per_token(cache_implementation="dynamic")
                cell.ms_per_step = mtp_ms  # per generated token
                cell.tokens_per_s = batch * 1000 / mtp_ms if mtp_ms else None
                cell.acceptance_rate = stats.get("acceptance_rate")
                cell.tokens_per_step = stats.get("tokens_per_step")
                cell.plain_ms_per_token = plain_ms
                cell.speedup_vs_plain = plain_ms / mtp_ms if mtp_ms and plain_ms else None
                equal = torch.equal(out, plain_out)

                def ms(value: float | None) -> str:
                    return f"{value:.3f}" if value else "n/a (timing noise exceeds the decode time)"

                notes = [
                    f"{prompts} prompts, {n} new tokens per row in every call (eos off)",
                    f"equal to plain greedy: {equal} (eager MTP loop: {torch.equal(eager_out, plain_out)})",
                    f"plain generate() {ms(plain_ms)} ms/token"
                    + (f" (MTP x{cell.speedup_vs_plain:.2f})" if cell.speedup_vs_plain else ""),
                    f"eager MTP loop {ms(eager_mtp_ms)}",
                    f"transformers' loop, dynamic cache {ms(dynamic_ms)}",
                ]
                if mtp_ms is None:
                    notes.insert(1, "no MTP time: the n-token and 1-token calls' difference is not positive")
                if prompts == "task":  # acceptance on the answers themselves: eos on, untimed
                    answered = model.generate(ids, max_new_tokens=n, attention_mask=mask, do_sample=False,
                                              pad_token_id=0, mtp_speculative=True, fast_loop=True,
                                              mtp_draft_tokens=1)  # fmt: skip
                    until_eos = model.last_speculative_stats or {}
                    lengths = (answered[:, ids.shape[1] :] != 0).sum(dim=1).float()
                    notes.append(
                        f"up to eos (untimed): acceptance {until_eos.get('acceptance_rate', 0):.3f}, "
                        f"{until_eos.get('tokens_per_step', 0):.2f} tokens/step, mean answer {lengths.mean():.0f} "
                        f"tokens (of at most {n})"
                    )
                note = "; ".join(notes)
                if not equal:
                    note += "; " + differences_note(token_differences(model, plain_out, out, mask), batch)
                    note += fp32_equality(model, ids, mask, n, device)
                cell.note = note
                if model.__dict__.get("fast_speculative_error"):
                    cell.note += f"; device loop failed: {model.fast_speculative_error[:150]}"
            except torch.OutOfMemoryError:
                cell.note = "out of memory"
            except Exception as error:
                cell.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            progress(f"ours-mtp batch {batch} context {cell.context}: {cell.ms_per_step} ms/token {cell.note}")
            cells.append(cell)
            if emit is not None:  # each cell reported as it is measured
                emit(cell)
    model.__dict__.pop("_fast_speculative_buffers", None)
    return cells


# -- the run ----------------------------------------------------------------------------------------------------
def run_decode_bench(
    plan: DecodePlan,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    checkpoint: str | None = None,
    output_dir: str | Path = "outputs/bench-decode",
    progress: Callable[[str], None] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run the rows of `plan`; write `bench_decode.json` and `bench_decode.md` to `output_dir`; return results."""
    unknown = sorted(set(plan.rows) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    device, dtype, output_dir, progress = bench_setup(device, dtype, output_dir, progress)
    bandwidth = copy_bandwidth(device)
    if bandwidth is None:  # CPU: no meaningful floor; use a nominal figure so the smoke test covers the arithmetic
        bandwidth = 1e11
    progress(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    results: dict[str, Any] = {
        "command": command,
        "machine": machine_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "checkpoint": checkpoint or "random weights",
        "plan": asdict(plan) | {"config": None},
        "copy_bandwidth_tb_s": bandwidth / 1e12,
        "floor": "active weights in the bench dtype (routed experts: expected distinct experts under uniform "
        "routing) + latent cache bytes, over the measured copy bandwidth; one floor per (batch, context), the same "
        "for every row",
        "cells": [],
    }
    with tempfile.TemporaryDirectory(prefix="hf-deepseek-bench-decode-") as scratch:
        if checkpoint is None:
            progress(f"building random weights at the benchmark shapes on {device}")
            build_checkpoint(DeepSeekConfig(**plan.config), Path(scratch), device, dtype)
        source = checkpoint or scratch
        config = DeepSeekConfig.from_pretrained(source)
        results["config"] = {k: getattr(config, k) for k in FULL_CONFIG}
        floor = floor_model(config, dtype)

        def emit(cell: DecodeCell) -> None:
            results["cells"].append(asdict(cell))
            write_decode_report(results, output_dir)

        models: dict[str, Any] = {}  # each loaded at its first row, kept for the later ones
        for name in run_order(plan.rows):
            ours = name.startswith("ours")
            key = "ours" if ours else "transformers"
            if key not in models:
                models[key] = load(DeepSeekForCausalLM if ours else DeepseekV3ForCausalLM, source, device, dtype)
            model = models[key]
            if name in FP8_ROWS + FP8_HEAD_ROWS:
                from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_inference

                if not model.has_fp8_weights():
                    convert_to_fp8_inference(model)
                if name in FP8_HEAD_ROWS:  # converts what is left in bf16: the head alone
                    convert_to_fp8_inference(model, FP8Recipe(skip=()))
            if name == "ours-mtp":
                run_mtp_row(model, plan, device, progress, emit)
            elif name in PREFILL_ROWS:
                run_prefill_row(name, model, plan, device, progress, emit)
            elif "generate" in name:
                run_generate_row(name, model, plan, device, floor, bandwidth, progress, emit, output_dir)
            else:
                run_step_row(STEP_ROWS[name], model, plan, device, dtype, bandwidth, progress, floor, emit, output_dir)
        models.clear()
        gc.collect()
    add_ratios(results)
    write_decode_report(results, output_dir)
    return results


def run_order(rows: list[str]) -> list[str]:
    """The rows in the order asked (the most wanted first survive a run cut short), the FP8 rows last: the first
    converts our loaded model in place (and the FP8-head rows after them: they quantise its head as well)."""
    stages = (FP8_ROWS, FP8_HEAD_ROWS)
    bf16 = [r for r in rows if not any(r in stage for stage in stages)]
    return bf16 + [r for stage in stages for r in rows if r in stage]


def add_ratios(results: dict[str, Any]) -> None:
    """Per (batch, context): speed-ups of each row over transformers eager and over transformers' best row."""
    by_cell: dict[tuple[int, int], dict[str, dict]] = {}
    for cell in results["cells"]:
        by_cell.setdefault((cell["batch"], cell["context"]), {})[cell["row"]] = cell
    for rows in by_cell.values():
        eager = (rows.get("transformers-eager") or {}).get("ms_per_step")
        peers = [rows[r]["ms_per_step"] for r in ("transformers-eager", "transformers-compile")
                 if r in rows and rows[r]["ms_per_step"]]  # fmt: skip
        tf_generate = rows.get("transformers-generate") or {}
        # transformers' prefill: its prefill row's, else its generate() row's
        prefill = (rows.get("transformers-prefill") or {}).get("prefill_ms") or tf_generate.get("prefill_ms")
        for cell in rows.values():
            ms = cell["ms_per_step"]
            cell["speedup_vs_transformers_eager"] = eager / ms if eager and ms else None
            if "generate" in cell["row"] or cell["row"] in PREFILL_ROWS:  # against transformers' generate()
                peer = tf_generate.get("ms_per_step")
                cell["speedup_vs_transformers_best"] = peer / ms if peer and ms else None
                own = cell.get("prefill_ms")
                cell["prefill_speedup_vs_transformers"] = prefill / own if prefill and own else None
            else:
                cell["speedup_vs_transformers_best"] = min(peers) / ms if peers and ms else None


def write_decode_report(results: dict[str, Any], output_dir: Path) -> None:
    (output_dir / "bench_decode.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "bench_decode.md").write_text(markdown_table(results))


def markdown_table(results: dict[str, Any]) -> str:
    def fmt(value, spec):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = [
        f"`{results['command']}`  ",
        f"{results['machine']['device']}, torch {results['machine']['torch']}, transformers "
        f"{results['machine']['transformers']}, {results['dtype']}, copy bandwidth "
        f"{results['copy_bandwidth_tb_s']:.2f} TB/s; floor = {results['floor']}",
        *(["", CPU_NOTE] if results["machine"]["device"].startswith("cpu") else []),
        "",
        "x tf best: against transformers' fastest step row (eager, compile) in the same cell; for `generate()` rows "
        "against transformers' `generate()` (prefill: prompt tokens a second of a 1-token call, and its ratio)",
        "",
        "| row | batch | context | ms/step (median) | tokens/s | peak GiB | floor ms | floor/actual | "
        "x tf eager | x tf best | prefill tok/s | prefill x tf | accept | tok/step | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(results["cells"], key=lambda c: (c["batch"], c["context"], ROWS.index(c["row"]))):
        lines.append(
            f"| {c['row']} | {c['batch']} | {c['context']} | {fmt(c['ms_per_step'], '.2f')} | "
            f"{fmt(c['tokens_per_s'], ',.0f')} | {fmt(c['peak_memory_gib'], '.1f')} | {fmt(c['floor_ms'], '.2f')} | "
            f"{fmt(c['floor_fraction'], '.2f')} | {fmt(c.get('speedup_vs_transformers_eager'), '.1f')} | "
            f"{fmt(c.get('speedup_vs_transformers_best'), '.2f')} | {fmt(c.get('prefill_tokens_per_s'), ',.0f')} | "
            f"{fmt(c.get('prefill_speedup_vs_transformers'), '.2f')} | {fmt(c['acceptance_rate'], '.2f')} | "
            f"{fmt(c['tokens_per_step'], '.2f')} | {c['note']} |"
        )
    return "\n".join(lines) + "\n"


def merge_results(paths: list[str], output_dir: str | Path) -> dict[str, Any]:
    """One report from runs of the same plan split across processes (e.g. one GPU each): cells concatenated,
    commands and machines listed, ratios recomputed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(runs[0])
    merged["command"] = " ; ".join(r["command"] for r in runs)
    merged["cells"] = [cell for r in runs for cell in r["cells"]]
    merged["copy_bandwidth_tb_s"] = min(r["copy_bandwidth_tb_s"] for r in runs)
    add_ratios(merged)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_decode_report(merged, output_dir)
    return merged


def plan_from_args(args: argparse.Namespace) -> DecodePlan:
    plan = replace(TINY_DECODE_PLAN if args.tiny else FULL_DECODE_PLAN)
    if args.batch_sizes:
        plan.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.contexts:
        plan.contexts = [int(c) for c in args.contexts.split(",")]
    if args.rows:
        plan.rows = [r.strip() for r in args.rows.split(",")]
    if args.steps:
        plan.steps = args.steps
    if args.warmup_steps is not None:
        plan.warmup_steps = args.warmup_steps
    if args.mtp_contexts:
        plan.mtp_contexts = [int(c) for c in args.mtp_contexts.split(",")]
    if args.mtp_new_tokens:
        plan.mtp_new_tokens = args.mtp_new_tokens
    if getattr(args, "mtp_prompts", None):
        plan.mtp_prompts = args.mtp_prompts
    if getattr(args, "generate_new_tokens", None):
        plan.generate_new_tokens = args.generate_new_tokens
    plan.profile = [cell.strip() for cell in (getattr(args, "profile", None) or "").split(",") if cell.strip()]
    for option, per_row in ((args.row_batch_sizes, plan.row_batch_sizes), (getattr(args, "row_contexts", None),
                                                                          plan.row_contexts)):  # fmt: skip
        for item in (option or "").split(";"):
            if item.strip():
                name, sizes = item.split("=")
                per_row[name.strip()] = [int(b) for b in sizes.split(",")]
    return plan


def run_decode_bench_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `hf-deepseek bench decode` (arguments defined in `hf_deepseek.cli`)."""
    if args.merge:
        return merge_results(args.merge.split(","), args.output_dir)
    words = ["hf-deepseek bench decode"]
    for name in ("device", "tiny", "dtype", "checkpoint", "batch_sizes", "contexts", "rows", "row_batch_sizes",
                 "row_contexts", "profile", "steps", "warmup_steps", "mtp_contexts", "mtp_new_tokens", "mtp_prompts",
                 "generate_new_tokens", "output_dir"):  # fmt: skip
        value = getattr(args, name, None)
        if value not in (None, False):
            words.append(
                "--"
                + name.replace("_", "-")
                + ("" if value is True else f" '{value}'" if ";" in str(value) else f" {value}")
            )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return run_decode_bench(
        plan_from_args(args), args.device, dtype, args.checkpoint, args.output_dir, command=" ".join(words)
    )
