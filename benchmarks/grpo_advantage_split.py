"""Where one GRPO step's push would go, for a model and a recipe's GRPO data: sample a batch as GRPO does (prompts x
16 at temperature 1), score it with the stage's rewards and weights, take TRL's group advantages (`scale_rewards`
"group"), clamp them at 0 as `positive_advantages_only` does, and report the share of the positive push on correct
and on wrong completions (wrong ones are pushed up in groups where the format reward alone varies), the groups with
no reward variance (no signal) and the lengths. No training; CPU is enough (1,024 completions in ~2.5 min a thread):

    python benchmarks/grpo_advantage_split.py CHECKPOINT [--prompts 64] [--recipe r1_add_sub] [KEY=VALUE ...]

KEY=VALUE are the stage's recipe overrides (`grpo.data.bucket_weights.add4=4`), as train_wall.py takes them.
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.trainers.recipes import apply_overrides, build_dataset, load_recipe
from hf_deepseek.trainers.rewards import get_reward_funcs


@torch.inference_mode()
def sample(model, tokenizer, dataset, generations: int, max_new_tokens: int, per_batch: int = 8) -> list[dict]:
    """Each prompt's completions (chat template, left-padded, as TRL samples them) with their reward columns."""
    tokenizer.padding_side = "left"
    rows = []
    for start in range(0, len(dataset), per_batch):
        batch = dataset.select(range(start, min(len(dataset), start + per_batch)))
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch["prompt"]]
        repeated = [t for t in texts for _ in range(generations)]
        inputs = tokenizer(repeated, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **inputs,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, ids in enumerate(out[:, inputs["input_ids"].shape[1] :].tolist()):
            length = next((j + 1 for j, t in enumerate(ids) if t == tokenizer.eos_token_id), len(ids))
            columns = {k: batch[k][i // generations] for k in batch.column_names if k != "prompt"}
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
            rows.append({"text": text, "ids": ids[:length], "columns": columns})
    return rows


def split(rows: list[dict], rewards: list[list[float]], weights: list[float], generations: int) -> dict:
    """The positive-advantage push of one batch: on correct (accuracy reward > 0) and on wrong completions."""
    per_func = torch.tensor(rewards, dtype=torch.float64)  # [completions, functions]
    total = (per_func * torch.tensor(weights, dtype=torch.float64)).sum(1).view(-1, generations)
    advantages = ((total - total.mean(1, keepdim=True)) / (total.std(1, keepdim=True) + 1e-4)).flatten()
    push = advantages.clamp(min=0)
    right = per_func[:, 0] > 0
    lengths = torch.tensor([len(r["ids"]) for r in rows], dtype=torch.float64)
    wrong_pushed = ~right & (push > 0)
    return {
        "completions": len(rows),
        "accuracy": per_func[:, 0].mean().item(),
        "format": per_func[:, 1].mean().item() if per_func.shape[1] > 1 else None,
        "groups": len(rows) // generations,
        "groups_without_variance": int((total.std(1) < 1e-6).sum()),
        "groups_with_a_correct_completion": int(right.view(-1, generations).any(1).sum()),
        "push_on_correct": (push[right].sum() / push.sum()).item(),
        "push_on_wrong": (push[~right].sum() / push.sum()).item(),
        "wrong_completions_pushed": int(wrong_pushed.sum()),
        "mean_length": lengths.mean().item(),
        "mean_length_correct": lengths[right].mean().item() if right.any() else None,
        "example_wrong_pushed": next((r["text"][:400] for r, w in zip(rows, wrong_pushed, strict=True) if w), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--recipe", default="r1_add_sub")
    parser.add_argument("--stage", default="grpo")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=352)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    recipe = apply_overrides(load_recipe(args.recipe), args.stage, args.overrides)
    section = recipe[args.stage]
    dataset = build_dataset(recipe, args.stage).shuffle(seed=args.seed).select(range(args.prompts))
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    rows = sample(model, tokenizer, dataset, args.generations, args.max_new_tokens)
    funcs = get_reward_funcs(section.get("rewards", ["accuracy", "format"]))
    weights = section.get("reward_weights", [1.0] * len(funcs))
    completions = [[{"role": "assistant", "content": r["text"]}] for r in rows]
    columns = {k: [r["columns"][k] for r in rows] for k in rows[0]["columns"]}
    scores = [f(prompts=[None] * len(rows), completions=completions, completion_ids=[r["ids"] for r in rows], **columns)
              for f in funcs]  # fmt: skip
    rewards = [[0.0 if s[i] is None else s[i] for s in scores] for i in range(len(rows))]
    result = {"checkpoint": args.checkpoint, "overrides": args.overrides}
    result.update(split(rows, rewards, weights, args.generations))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
