"""MTP self-speculative decoding against plain greedy `generate` on the embedded trained checkpoint: draft
acceptance, tokens per main-model pass and the speed-up, at batch 1 and 8, on the held-out sums (chat template).

    python benchmarks/mtp_speculative_bench.py --json mtp_speculative.json

Both run in the same process on the same left-padded batches, interleaved batch by batch; every speculative
output is checked to equal the plain greedy one. Times are the median over `--repeats` passes over all prompts.
"""

import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch
from transformers import AutoTokenizer

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.evals.task_data import load_rows, prompt_text
from hf_deepseek.modeling.speculative import MTPDrafter


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    rows = load_rows("addition")["test"][:count]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(row)}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for row in rows
    ]


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def new_tokens(sequences: torch.Tensor, prompt_width: int, eos: int) -> int:
    """Tokens generated per row up to and including eos (the fill after it is not counted)."""
    total = 0
    for row in sequences[:, prompt_width:].tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


@contextmanager
def drafting_clock(seconds: list[float]):
    """Adds the time spent in the MTP drafter (its module and head) to `seconds[0]`."""
    originals = {name: getattr(MTPDrafter, name) for name in ("prefill", "step")}

    def clocked(original):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - start

        return run

    for name, original in originals.items():
        setattr(MTPDrafter, name, clocked(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(MTPDrafter, name, original)


@torch.inference_mode()
def measure(model, tokenizer, prompts, batch_size: int, max_new_tokens: int, repeats: int, sample: dict) -> dict:
    """Plain against speculative generate over all prompts; `sample` (temperature, top_p) switches to sampling,
    where outputs are not compared (they are random) but acceptance and speed are."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batches = [left_padded(prompts[i : i + batch_size], pad, model.device) for i in range(0, len(prompts), batch_size)]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=bool(sample), eos_token_id=eos, pad_token_id=pad, **sample)
    model.generate(batches[0][0], attention_mask=batches[0][1], mtp_speculative=True, **kwargs)  # warm-up
    model.generate(batches[0][0], attention_mask=batches[0][1], **kwargs)
    plain_s, spec_s, mismatches, drafting = [], [], 0, [0.0]
    drafted = accepted = steps = tokens = plain_tokens = plain_row_steps = 0
    per_row_pass = []  # tokens committed per row per main-model pass, one figure per batch
    for repeat in range(repeats):
        plain_total = spec_total = 0.0
        for ids, mask in batches:
            seconds, plain = timed(lambda ids=ids, mask=mask: model.generate(ids, attention_mask=mask, **kwargs))
            plain_total += seconds
            with drafting_clock(drafting):
                seconds, spec = timed(
                    lambda ids=ids, mask=mask: model.generate(ids, attention_mask=mask, mtp_speculative=True, **kwargs)
                )
            spec_total += seconds
            mismatches += int(not sample and not torch.equal(plain, spec))
            if repeat == 0:
                stats = model.last_speculative_stats
                drafted, accepted = drafted + stats["draft_tokens"], accepted + stats["accepted"]
                steps += stats["steps"]
                per_row_pass.append(stats["tokens_per_step"])
                tokens += new_tokens(spec, ids.shape[1], eos)
                plain_tokens += new_tokens(plain, ids.shape[1], eos)
                plain_row_steps += plain[:, ids.shape[1] :].numel()  # plain generate steps every row to the end
        plain_s.append(plain_total)
        spec_s.append(spec_total)
    plain, spec = statistics.median(plain_s), statistics.median(spec_s)
    drafting_share = drafting[0] / sum(spec_s)
    return {
        "batch_size": batch_size,
        "decoding": f"sampling {sample}" if sample else "greedy",
        "prompts": len(prompts),
        "new_tokens": tokens,
        "acceptance_rate": accepted / drafted,
        "draft_tokens": drafted,
        "main_passes": steps,
        "tokens_per_step": statistics.mean(per_row_pass),
        "plain_tok_s": plain_tokens / plain,
        "speculative_tok_s": tokens / spec,
        "speedup": (tokens / spec) / (plain_tokens / plain),
        "plain_rows_busy": plain_tokens / plain_row_steps,  # rows that had not ended, over all row-steps
        "drafting_share": drafting_share,  # of the speculative time, spent in the MTP drafter
        "speedup_without_drafting": (tokens / (spec * (1 - drafting_share))) / (plain_tokens / plain),
        "outputs_differing": None if sample else mismatches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/hf-deepseek-r1-tiny")
    parser.add_argument("--prompts", type=int, default=64, help="held-out sums to run (the first N)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sample-temperature", type=float, default=0.7, help="also measure sampling; 0: skip")
    parser.add_argument("--sample-top-p", type=float, default=0.95)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = DeepSeekForCausalLM.from_pretrained(args.checkpoint).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = chat_prompts(tokenizer, args.prompts)
    results = []
    modes = [{}]
    if args.sample_temperature > 0:
        modes.append({"temperature": args.sample_temperature, "top_p": args.sample_top_p})
    for sample in modes:
        for batch_size in args.batch_sizes:
            torch.manual_seed(0)
            result = measure(model, tokenizer, prompts, batch_size, args.max_new_tokens, args.repeats, sample)
            results.append(result)
            print(
                f"{result['decoding']}, batch {batch_size}: acceptance {result['acceptance_rate']:.1%} "
                f"({result['draft_tokens']} drafts), "
                f"{result['tokens_per_step']:.2f} tokens per row per main pass, "
                f"speculative {result['speculative_tok_s']:.0f} tok/s vs plain {result['plain_tok_s']:.0f} tok/s: "
                f"{result['speedup']:.2f}x ({result['speedup_without_drafting']:.2f}x without the drafter's "
                f"{result['drafting_share']:.0%} of the time); outputs differing: {result['outputs_differing']}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "device": args.device, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
