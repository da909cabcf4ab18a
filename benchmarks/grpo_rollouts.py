"""GRPO rollouts per second: TRL's default generation against the fast decode path, same model, prompts and batch.

    python benchmarks/grpo_rollouts.py --json rollouts.json [--batch 64 --new-tokens 256 --layers 8]

"TRL default" is the `GenerationConfig` that `trl.GRPOTrainer` 1.16 builds (sampling at its default temperature,
top_p and top_k, `cache_implementation=None`, `disable_compile=True`) passed to `model.generate` on a model left in
training mode, as TRL does; "fast" is the same config through `hf_deepseek.trainers.grpo.fast_generation_config`
(static latent cache, compiled CUDA-graph decode step), what `DeepSeekGRPOTrainer` uses on a GPU. The prompts are
the project's GRPO prompts (3-digit addition in its chat template), left-padded as TRL pads them. Random weights
would stop at a random EOS, so every rollout is forced to the full length (`min_new_tokens`): both paths decode
exactly batch x new-tokens tokens. The fast path's first call (compilation) is timed apart; a greedy run checks
that both paths produce the same tokens.
"""

import argparse
import json
import statistics
import time

import torch
from sft_throughput import MODEL as SFT_MODEL  # a sibling script: benchmarks/ is on sys.path when run
from transformers import GenerationConfig

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.data import build_tokenizer
from hf_deepseek.data.r1 import grpo_row
from hf_deepseek.data.reasoning_tasks import task_examples
from hf_deepseek.trainers.grpo import fast_generation_config

# sft_throughput.py's ~1B-parameter model; the number of layers comes from --layers
MODEL = {k: v for k, v in SFT_MODEL.items() if k != "num_hidden_layers"} | {"max_position_embeddings": 2048}


def trl_generation_config(tokenizer, new_tokens: int) -> GenerationConfig:
    """What GRPOTrainer builds with GRPOConfig's defaults (temperature 1, top_p 1, top_k 0, no min_p)."""
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random weights: no early EOS, so both paths decode the same number of tokens
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        cache_implementation=None,
        disable_compile=True,
    )


def timed_generate(model, inputs, config: GenerationConfig, seed: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(seed)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--batch", type=int, default=64, help="rollouts generated at once (TRL: per-device batch)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    config = DeepSeekConfig(
        **MODEL,
        num_hidden_layers=args.layers,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).to("cuda", torch.bfloat16).train()  # TRL generates in training mode
    prompts = [grpo_row(p)["prompt"] for p in task_examples("addition", args.batch, 0)]
    inputs = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    ).to("cuda")
    trl_config = trl_generation_config(tokenizer, args.new_tokens)
    fast_config = fast_generation_config(trl_config)

    results = {"batch": args.batch, "prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": args.new_tokens}
    results["parameters"] = sum(p.numel() for p in model.parameters())
    results["layers"] = args.layers
    compile_s, _ = timed_generate(model, inputs, fast_config, seed=0)  # compiles the decode step
    results["fast_first_call_s"] = compile_s
    for name, gen_config in (("trl_default", trl_config), ("fast", fast_config)):
        if name == "trl_default":
            timed_generate(model, inputs, gen_config, seed=0)  # warm-up (allocator, kernels)
        seconds = [timed_generate(model, inputs, gen_config, seed=1 + r)[0] for r in range(args.repeats)]
        median = statistics.median(seconds)
        results[name] = {
            "seconds": seconds,
            "rollouts_per_s": args.batch / median,
            "tokens_per_s": args.batch * args.new_tokens / median,
            "ms_per_step": 1000 * median / args.new_tokens,
        }
        print(name, json.dumps(results[name]), flush=True)
    results["speedup"] = results["fast"]["rollouts_per_s"] / results["trl_default"]["rollouts_per_s"]

    greedy = dict(do_sample=False, max_new_tokens=32, min_new_tokens=32)
    trl_greedy, fast_greedy = (GenerationConfig(**{**c.to_dict(), **greedy}) for c in (trl_config, fast_config))
    _, a = timed_generate(model, inputs, trl_greedy, seed=0)
    _, b = timed_generate(model, inputs, fast_greedy, seed=0)
    results["greedy_token_agreement"] = (a == b).float().mean().item()
    print(json.dumps(results), flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
