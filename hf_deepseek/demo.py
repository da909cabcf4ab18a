"""`make demo`: train a tiny DeepSeek-V3 (MLA, MoE, MTP) on 2-digit addition on the CPU, save it in
the Hugging Face format, reload it through `AutoModelForCausalLM`, and score it on held-out sums.
"""

import logging
import math
import statistics

import torch
from rich.console import Console
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
from hf_deepseek.data import addition_examples, build_tokenizer

IGNORE_INDEX = -100


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> DeepSeekConfig:
    """A DeepSeek-V3 in miniature: every part of the architecture, ~0.2M parameters."""
    return DeepSeekConfig(
        vocab_size=len(tokenizer),
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
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_batch(tokenizer: PreTrainedTokenizerFast, examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """`<|bos|>12+34=46<|eos|>` sequences, right-padded; labels only on the answer and eos."""
    rows = []
    for example in examples:
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(example["prompt"], add_special_tokens=False)]
        answer = [*tokenizer.encode(example["answer"], add_special_tokens=False), tokenizer.eos_token_id]
        rows.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(labels + [IGNORE_INDEX] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def train(
    model: DeepSeekForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float = 6e-3,
) -> tuple[list[float], list[float]]:
    """AdamW, short linear warmup then cosine decay; returns the per-step main and MTP losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    examples = addition_examples(steps * batch_size, seed=seed, split="train")
    main_losses, mtp_losses = [], []
    model.train()
    progress = tqdm(range(steps), desc="training", unit="step")
    for _ in progress:
        batch = encode_batch(tokenizer, [next(examples) for _ in range(batch_size)])
        output = model(**batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        mtp = output.mtp_loss.item()  # no balance loss here (aux_loss_alpha=0): loss = main + weight * mtp
        main_losses.append(output.loss.item() - model.config.mtp_loss_weight * mtp)
        mtp_losses.append(mtp)
        progress.set_postfix(loss=f"{main_losses[-1]:.3f}", mtp_loss=f"{mtp:.3f}")
    return main_losses, mtp_losses


@torch.no_grad()
def held_out_accuracy(model_dir: str, seed: int, count: int = 10, console: Console | None = None) -> float:
    """Reload the saved model through the Auto classes and greedily answer `count` test-split sums."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for example in addition_examples(count, seed=seed, split="test"):
        ids = [tokenizer.bos_token_id, *tokenizer.encode(example["prompt"], add_special_tokens=False)]
        prompt = torch.tensor([ids])
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        guess = tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
        correct += guess == example["answer"]
        if console:
            mark = "[green]ok[/]" if guess == example["answer"] else f"[red]expected {example['answer']}[/]"
            console.print(f"  {example['prompt']}{guess:<4} {mark}")
    return correct / count


def run_demo(steps: int = 1000, batch_size: int = 128, output_dir: str = "outputs/demo-model", seed: int = 0) -> float:
    """Train, save, reload and evaluate the tiny model; print a narrated summary; return accuracy."""
    console = Console()
    torch.set_num_threads(1)  # a tiny model gains little from 2 threads and loses ~100x when a core is busy
    transformers_logging.disable_progress_bar()  # keep the narration readable: one bar, for training
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU 4-bit kernel notice is unrelated
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = DeepSeekForCausalLM(tiny_config(tokenizer))
    parameters = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold]Tiny DeepSeek-V3[/]: {parameters:,} parameters, vocabulary of {len(tokenizer)} characters. "
        f"Training {steps} steps of {batch_size} sums on the CPU."
    )
    main_losses, mtp_losses = train(model, tokenizer, steps, batch_size, seed)
    window = max(1, min(10, steps // 4))
    first, last = statistics.mean(main_losses[:window]), statistics.mean(main_losses[-window:])
    mtp_first, mtp_last = statistics.mean(mtp_losses[:window]), statistics.mean(mtp_losses[-window:])
    console.print(
        f"Next-token loss fell from {first:.3f} to {last:.3f}; the MTP head, which predicts the "
        f"token after next, from {mtp_first:.3f} to {mtp_last:.3f} (means of {window} steps)."
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    console.print(
        f"Saved model and tokenizer to [cyan]{output_dir}[/]; reloading with "
        "AutoModelForCausalLM.from_pretrained and answering held-out sums greedily:"
    )
    accuracy = held_out_accuracy(output_dir, seed=seed, console=console)
    console.print(f"[bold]Held-out accuracy: {accuracy:.0%}[/] (sums from the test split, never trained on).")
    return accuracy
