"""Chat speed of a checkpoint through the chat app's own path: `ChatResponder.respond` (the `/chat` endpoint's
function: chat template, R1 instruction, `generate` on a worker thread with a streamer), greedy, batch 1.

Each prompt is answered once untimed (warm-up), then `--repeats` times; tokens/s is the reply tokens over the wall
time of the replies, as the app's stats line counts them.

    python benchmarks/chat_speed.py checkpoints/hf-deepseek-r1-add-sub --threads 1 --output outputs/chat_speed.json
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hf_deepseek.app.chat import EXAMPLE_PROMPTS, ChatResponder, load_chat_model


def reply_tokens(responder: ChatResponder, message: str, history: list[dict]) -> tuple[int, float, str]:
    """(reply tokens, seconds, final answer text) for one greedy reply, timed around the whole stream."""
    start = time.perf_counter()
    *_, (messages, stats) = responder.respond(message, history, temperature=0.0, max_new_tokens=512)
    seconds = time.perf_counter() - start
    return int(stats.split(" tokens in ")[0]), seconds, messages[-1].content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_chat_model(args.checkpoint, device="cpu")
    responder = ChatResponder(model, tokenizer)
    rows = []
    for prompt in EXAMPLE_PROMPTS:
        reply_tokens(responder, prompt, [])
        for _ in range(args.repeats):
            tokens, seconds, answer = reply_tokens(responder, prompt, [])
            rows.append({"prompt": prompt, "tokens": tokens, "seconds": round(seconds, 4), "answer": answer})
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    result = {
        "command": "python " + " ".join(sys.argv),
        "checkpoint": args.checkpoint,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "tokens_per_s": round(tokens / seconds, 1),
        "replies": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "replies"}))
    for r in rows:
        print(f"{r['tokens']:4d} tokens {r['seconds']:.2f} s  {r['prompt']!r} -> {r['answer']!r}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
