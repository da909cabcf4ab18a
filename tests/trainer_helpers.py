"""Builders shared by the trainer tests: tiny models with the project's tokenizer, short datasets, fast configs."""

import torch
from conftest import tiny_config
from datasets import Dataset

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.data import addition_examples, build_tokenizer, grpo_row, task_examples

# fp32 on the CPU, no checkpointing, no reporting integrations or progress bars: the fastest Trainer on a CI core
FAST_ARGS = dict(
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    logging_steps=1,
    dataloader_num_workers=0,
    seed=0,
)


def tiny_model(tokenizer, **overrides) -> DeepSeekForCausalLM:
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config = tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **ids, **overrides)
    return DeepSeekForCausalLM(config)


def addition_chats(n: int, seed: int = 0) -> Dataset:
    """Short conversations (`12+34=` -> `46`): ~15 tokens each."""
    rows = [
        {"messages": [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["answer"]}]}
        for e in addition_examples(n, seed)
    ]
    return Dataset.from_list(rows)


def grpo_problems(n_per_task: int = 4) -> Dataset:
    rows = [grpo_row(e) for task in ("countdown", "arithmetic") for e in task_examples(task, n_per_task, 0)]
    return Dataset.from_list(rows)


def router_biases(model) -> list[torch.Tensor]:
    return [r.e_score_correction_bias.detach().clone() for r in model.routers()]


def make_imbalanced(model, tokenizer, dataset: Dataset, strength: float = 1.0) -> None:
    """Point the first top_k experts' router rows along the mean router input, so nearly every token picks them."""
    inputs = []
    hooks = [r.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach())) for r in model.routers()]
    batch = tokenizer.apply_chat_template(
        [row["messages"] for row in dataset.select(range(32))], return_tensors="pt", padding=True, return_dict=True
    )
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for hook in hooks:
            hook.remove()
        for router, x in zip(model.routers(), inputs, strict=True):
            direction = x.mean(0) / x.mean(0).norm()
            router.weight[: router.top_k] += strength * direction / (x @ direction).std()


def tokenizer():
    return build_tokenizer()
