"""`hf-deepseek bench`: this project's model against transformers' `DeepseekV3ForCausalLM`, same weights and shapes.

Both models are loaded from one saved checkpoint (random weights at the chosen shapes, or `--checkpoint`) and
measured one after the other on the same device in the same run: KV-cache bytes per token per layer (with the
full multi-head-attention equivalent), prefill and decode tokens/s over a grid of batch sizes and context lengths,
peak memory (CUDA), and MTP self-speculative decoding (draft acceptance rate, speed-up over plain greedy decoding).
Output: a Markdown table, `bench.json` and PNG charts (`bench_report`). Needs only torch and transformers (no
lm-eval, datasets or matplotlib), so it runs in a bare GPU image.
"""

import argparse
import gc
import inspect
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache

import hf_deepseek
from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.evals.bench_report import CPU_NOTE
from hf_deepseek.modeling.speculative import DraftStats, mtp_greedy_generate

OURS, PEER = "hf_deepseek", "transformers DeepseekV3"


@dataclass
class BenchPlan:
    """What to measure: the model shapes (unless a checkpoint is given) and the (batch, context) grid."""

    config: dict[str, Any]
    batch_sizes: list[int]
    contexts: list[int]
    decode_steps: int = 32
    warmup_steps: int = 2
    prefill_repeats: int = 2
    max_tokens: int = 2**18  # cells with batch * context above this are skipped (prefill activations)
    mtp_prompts: int = 8
    mtp_prompt_len: int = 32
    mtp_new_tokens: int = 32


# ~5B parameters (8 layers, hidden 2048, 64 experts top-6, MLA with DeepSeek-V3's per-head dimensions, 1 MTP layer)
FULL_CONFIG = dict(
    vocab_size=129280,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=16,
    first_k_dense_replace=1,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    num_nextn_predict_layers=1,
    max_position_embeddings=65536,
)
TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    first_k_dense_replace=1,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    num_nextn_predict_layers=1,
    max_position_embeddings=512,
)
FULL_PLAN = BenchPlan(FULL_CONFIG, batch_sizes=[1, 8, 32], contexts=[512, 2048, 8192, 32768], mtp_prompts=4)
TINY_PLAN = BenchPlan(
    TINY_CONFIG,
    batch_sizes=[1, 2],
    contexts=[16, 64],
    decode_steps=4,
    warmup_steps=1,
    prefill_repeats=1,
    mtp_prompts=2,
    mtp_prompt_len=8,
    mtp_new_tokens=8,
)


@dataclass
class Cell:
    """One (model, batch, context) measurement; None where skipped, out of memory, or not measurable here."""

    model: str
    batch: int
    context: int
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    decode_ms_per_step: float | None = None
    peak_memory_gib: float | None = None
    cache_bytes: int | None = None
    note: str = ""


@dataclass
class ModelReport:
    name: str
    parameters: int
    cache_bytes_per_token_per_layer: float
    cache_dtype: str
    weights_gib: float | None
    mtp_note: str
    mtp_acceptance: float | None = None
    mtp_drafts: int = 0
    mtp_tokens_per_pass: float | None = None
    speculative_tok_s: float | None = None
    greedy_tok_s: float | None = None
    cells: list[Cell] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """Pass a cache under the name this model's forward takes (transformers 5.24 renamed it to `cache`)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def cache_nbytes(cache: DynamicCache) -> tuple[int, int, str]:
    """(bytes held, number of layers holding tensors, dtype) of a transformers cache, whatever it stores."""
    total, layers, dtype = 0, 0, ""
    for layer in cache.layers:
        tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t)]
        if tensors and tensors[0].numel():
            layers += 1
            total += sum(t.numel() * t.element_size() for t in tensors)
            dtype = str(tensors[0].dtype).removeprefix("torch.")
    return total, layers, dtype


def full_mha_bytes_per_token_per_layer(config: DeepSeekConfig, element_size: int) -> int:
    """What standard multi-head attention would cache: per-head keys (nope + rope) and values."""
    return (
        config.num_attention_heads
        * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        * (element_size)
    )


def latent_bytes_per_token_per_layer(config: DeepSeekConfig, element_size: int) -> int:
    """What MLA needs to cache: the normalised kv latent and the shared roped key."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * element_size


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return cache


@torch.inference_mode()
def decode(model, cache: DynamicCache, tokens: torch.Tensor) -> None:
    """Feed tokens [steps, B] one step at a time through the cache (teacher-forced: both models do equal work)."""
    for step in tokens:
        model(input_ids=step[:, None], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def measure_cell(model, name: str, batch: int, context: int, plan: BenchPlan, device: torch.device) -> Cell:
    cell = Cell(name, batch, context)
    if batch * context > plan.max_tokens:
        cell.note = f"skipped: batch x context > {plan.max_tokens}"
        return cell
    gen = torch.Generator().manual_seed(batch * 100_003 + context)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    tokens = torch.randint(0, vocab, (plan.warmup_steps + plan.decode_steps, batch), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = []
        for _ in range(plan.prefill_repeats):
            seconds, cache = timed(lambda: prefill(model, input_ids), device)
            times.append(seconds)
        cell.prefill_tok_s = batch * context / min(times)
        decode(model, cache, tokens[: plan.warmup_steps])
        seconds, _ = timed(lambda: decode(model, cache, tokens[plan.warmup_steps :]), device)
        cell.decode_tok_s = batch * plan.decode_steps / seconds
        cell.decode_ms_per_step = 1000 * seconds / plan.decode_steps
        cell.cache_bytes = cache_nbytes(cache)[0]
        if device.type == "cuda":
            cell.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        cell.note = "out of memory"
    finally:
        cache = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return cell


@torch.inference_mode()
def mtp_speculation(model: DeepSeekForCausalLM, prompts: Sequence[torch.Tensor], new_tokens: int, eos, device):
    """MTP self-speculative greedy decoding (`hf_deepseek.modeling.speculative`, batch size 1) against plain greedy
    `generate` on the same prompts: draft acceptance rate, tokens per main-model pass, and both speeds.

    The two produce the same tokens (speculation changes only the number of main-model passes); the first prompt
    is run once untimed to warm up."""
    eos = model.generation_config.eos_token_id if eos is None else eos  # the same stop rule for both
    eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = eos_list[0] if eos_list else 0
    stats, tokens, spec_s, greedy_s = DraftStats(), 0, 0.0, 0.0
    for i, prompt in enumerate([prompts[0], *prompts]):
        seconds, (ids, one) = timed(lambda p=prompt: mtp_greedy_generate(model, p, new_tokens, eos_list), device)
        plain_s, _ = timed(
            lambda p=prompt: model.generate(
                p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens, do_sample=False,
                eos_token_id=eos_list or None, pad_token_id=pad,
            ),
            device,
        )  # fmt: skip
        if i == 0:
            continue
        tokens += ids.shape[1] - prompt.shape[1]
        stats.drafted, stats.accepted = stats.drafted + one.drafted, stats.accepted + one.accepted
        stats.main_passes += one.main_passes
        spec_s, greedy_s = spec_s + seconds, greedy_s + plain_s
    return {
        "mtp_acceptance": stats.acceptance_rate if stats.drafted else None,
        "mtp_drafts": stats.drafted,
        "mtp_tokens_per_pass": tokens / stats.main_passes,
        "speculative_tok_s": tokens / spec_s,
        "greedy_tok_s": tokens / greedy_s,
    }


def acceptance_prompts(checkpoint: str | None, plan: BenchPlan, vocab: int, device: torch.device):
    """Prompts for the acceptance measurement: with a checkpoint and its tokenizer, held-out Countdown questions
    (in its chat template if it has one); otherwise random token ids (chance-level acceptance for random weights)."""
    tokenizer = None
    if checkpoint is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        except (OSError, ValueError):
            tokenizer = None
    if tokenizer is None:
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(0, vocab, (plan.mtp_prompts, plan.mtp_prompt_len), generator=gen)
        return [row[None].to(device) for row in ids], None, "random prompts; random weights draft at chance level"
    from hf_deepseek.evals.task_data import load_rows, prompt_text

    prompts = []
    for row in load_rows("countdown")["test"][: plan.mtp_prompts]:
        text = prompt_text(row)
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(text)["input_ids"]
        prompts.append(torch.tensor([ids], device=device))
    return prompts, tokenizer.eos_token_id, "held-out Countdown questions"


def build_checkpoint(config: DeepSeekConfig, directory: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Random weights (the model's own init) at `config`'s shapes, saved in the official layout both models read."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepSeekForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load(model_class, checkpoint: str | Path, device: torch.device, dtype: torch.dtype):
    """Load quietly: transformers' DeepseekV3 reports the MTP layer it drops as a table of unexpected keys."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(checkpoint, dtype=dtype, device_map=str(device))
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval()


def bench_model(
    name: str, model, plan: BenchPlan, device: torch.device, checkpoint: str | None, progress: Callable[[str], None]
) -> ModelReport:
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    measure_cell(model, name, 1, 16, BenchPlan({}, [1], [16], decode_steps=2, prefill_repeats=1), device)  # warm-up
    probe = prefill(model, torch.arange(8, device=device)[None] % model.config.vocab_size)
    nbytes, layers, dtype = cache_nbytes(probe)
    parameters = sum(p.numel() for p in model.parameters())
    report = ModelReport(name, parameters, nbytes / (8 * layers), dtype, weights_gib, mtp_note="")
    if isinstance(model, DeepSeekForCausalLM) and model.config.num_nextn_predict_layers > 0:
        prompts, eos, source = acceptance_prompts(checkpoint, plan, model.config.vocab_size, device)
        for key, value in mtp_speculation(model, prompts, plan.mtp_new_tokens, eos, device).items():
            setattr(report, key, value)
        report.mtp_note = f"batch 1, {len(prompts)} {source}"
        progress(f"{name}: MTP draft acceptance {report.mtp_acceptance}, {report.mtp_tokens_per_pass:.2f} tokens/pass")
    else:
        report.mtp_note = "no MTP drafting here (transformers drops the MTP layer on load)"
    for batch in plan.batch_sizes:
        for context in plan.contexts:
            cell = measure_cell(model, name, batch, context, plan, device)
            if cell.decode_tok_s is None:
                progress(f"{name}, batch {batch}, context {context}: {cell.note}")
            else:
                progress(
                    f"{name}, batch {batch}, context {context}: prefill {cell.prefill_tok_s:,.0f} tok/s, "
                    f"decode {cell.decode_tok_s:,.1f} tok/s"
                )
            report.cells.append(cell)
    return report


def run_bench(
    plan: BenchPlan,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    checkpoint: str | None = None,
    output_dir: str | Path = "outputs/bench",
    progress: Callable[[str], None] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Benchmark both models; write `bench.json`, `bench.md` and PNG charts to `output_dir`; return the results.

    `command` is recorded with the results (the command line that produced them)."""
    device, dtype, output_dir, progress = bench_setup(device, dtype, output_dir, progress)
    element_size = torch.empty((), dtype=dtype).element_size()
    from hf_deepseek.evals.bench_report import write_report

    with tempfile.TemporaryDirectory(prefix="hf-deepseek-bench-") as scratch:
        if checkpoint is None:
            progress(f"building random weights at the benchmark shapes on {device}")
            build_checkpoint(DeepSeekConfig(**plan.config), Path(scratch), device, dtype)
        source = checkpoint or scratch
        config = DeepSeekConfig.from_pretrained(source)
        results = {
            "command": command,
            "machine": machine_description(device),
            "dtype": str(dtype).removeprefix("torch."),
            "checkpoint": checkpoint or "random weights",
            "config": {key: getattr(config, key) for key in FULL_CONFIG},
            "plan": asdict(plan) | {"config": None},
            "kv_cache_bytes_per_token_per_layer": {
                "mla_latent": latent_bytes_per_token_per_layer(config, element_size),
                "full_mha_equivalent": full_mha_bytes_per_token_per_layer(config, element_size),
                "deepseek_v3_671b_latent": latent_bytes_per_token_per_layer(DeepSeekConfig(), element_size),
                "deepseek_v3_671b_full_mha": full_mha_bytes_per_token_per_layer(DeepSeekConfig(), element_size),
            },
            "models": [],
        }
        for name, model_class in ((OURS, DeepSeekForCausalLM), (PEER, DeepseekV3ForCausalLM)):
            progress(f"loading {name}")
            started = time.perf_counter()
            model = load(model_class, source, device, dtype)
            report = bench_model(name, model, plan, device, checkpoint, progress)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["models"].append(asdict(report))
            progress(f"{name} done in {time.perf_counter() - started:.0f} s")
            write_report(results, output_dir, progress, final=len(results["models"]) == 2)
    return results


def bench_setup(device: str, dtype: torch.dtype | None, output_dir: str | Path, progress: Callable | None):
    """The start every benchmark run shares: (device, dtype — bf16 on CUDA, fp32 elsewhere unless given —, the
    output folder, created, and a progress printer)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or timestamped_printer()
    if device.type == "cpu":
        progress(CPU_NOTE)
    return device, dtype, output_dir, progress


def timestamped_printer() -> Callable[[str], None]:
    """print, flushed, each line prefixed with the seconds since the run started (a killed run still shows them)."""
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    return progress


def machine_description(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": f"{device.type}: {name}",
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_deepseek": hf_deepseek.__version__,
        "python": platform.python_version(),
    }


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    plan = TINY_PLAN if args.tiny else FULL_PLAN
    plan = BenchPlan(**{**asdict(plan)})
    if args.batch_sizes:
        plan.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.contexts:
        plan.contexts = [int(c) for c in args.contexts.split(",")]
    if args.decode_steps:
        plan.decode_steps = args.decode_steps
    if args.max_tokens:
        plan.max_tokens = args.max_tokens
    return plan


def command_line(args: argparse.Namespace) -> str:
    """The `hf-deepseek bench` command that reproduces `args`."""
    words = ["hf-deepseek bench"]
    for name, value in vars(args).items():
        if name == "command" or value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        words.append(flag if value is True else f"{flag} {value}")
    return " ".join(words)


def run_bench_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `hf-deepseek bench` (arguments defined in `hf_deepseek.cli`)."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return run_bench(
        plan_from_args(args), args.device, dtype, args.checkpoint, args.output_dir, command=command_line(args)
    )
