"""The `hf-deepseek` command: one subcommand per job (`demo`, `train`, `eval`, `bench`, `chat`).

Each subcommand imports its module only when it runs, so `hf-deepseek --help` stays fast.
"""

import argparse


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every subcommand and its options."""
    parser = argparse.ArgumentParser(prog="hf-deepseek", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="the R1 story on a CPU: SFT from scratch, GRPO from the shipped SFT ancestor, lm-eval, architecture "
        "payoffs, chat command",
    )
    demo.add_argument("--recipe", default="r1_tiny", help="recipe of the miniature run (name or YAML path)")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    demo.add_argument("--sft-steps", type=int, default=120, help="SFT steps of the miniature run (0: skip stage 1)")
    demo.add_argument("--steps", "--grpo-steps", dest="grpo_steps", type=int, default=12, help="GRPO steps")
    demo.add_argument("--output-dir", default="outputs/demo", help="where the miniature run writes models and PNGs")
    demo.add_argument("--checkpoint", default="checkpoints/hf-deepseek-r1-tiny", help="model for stages 2 and 3")
    demo.add_argument("--sft-checkpoint", default="checkpoints/hf-deepseek-r1-tiny-sft", help="its SFT ancestor")
    demo.add_argument("--eval-limit", type=int, default=500, help="held-out sums for greedy pass@1 (0: skip)")
    demo.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="recipe override for the miniature run, e.g. --set model.config.hidden_size=256 "
        "--set grpo.args.learning_rate=1e-4 (a bare key sets an SFT arg)",
    )  # fmt: skip
    commands.add_parser(
        "eval",
        add_help=False,
        help="lm-eval with this plugin loaded and the project's offline tasks on the include path; takes "
        "lm-eval's own arguments (`hf-deepseek eval --help`)",
    )
    bench = commands.add_parser(
        "bench", help="systems benchmark of this model against transformers' DeepseekV3 with the same weights"
    )
    add_device_options(bench, "tiny shapes and grid, for a CPU smoke test")
    bench.add_argument("--checkpoint", help="benchmark this saved model (weights and shapes) instead of random ones")
    bench.add_argument("--batch-sizes", help="comma-separated, e.g. 1,8,32")
    bench.add_argument("--contexts", help="comma-separated context lengths, e.g. 512,2048,8192")
    bench.add_argument("--decode-steps", type=int, help="timed decode steps per (batch, context)")
    bench.add_argument("--max-tokens", type=int, help="skip cells whose batch x context exceeds this")
    bench.add_argument("--output-dir", default="outputs/bench", help="where bench.json and the PNG charts go")
    bench_kinds = bench.add_subparsers(dest="bench_command", metavar="{train,decode}")
    bench_train = bench_kinds.add_parser(
        "train",
        help="training step: transformers' DeepseekV3 vs this project in bf16 and FP8: tokens/s, MFU, peak memory",
    )
    add_device_options(bench_train, "tiny shapes and every variant, a CPU smoke test")
    bench_train.add_argument("--batch-size", type=int, help="sequences per step (default 8)")
    bench_train.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048)")
    bench_train.add_argument("--steps", type=int, help="timed steps (default 10)")
    bench_train.add_argument("--warmup-steps", type=int, help="untimed first steps: compilation, allocator (3)")
    bench_train.add_argument(
        "--variants",
        help="comma-separated, from transformers, hf_deepseek-bf16-eager, hf_deepseek-bf16, hf_deepseek-fp8, "
        "hf_deepseek-fp8-eager (default: all but the last)",
    )
    bench_train.add_argument("--peak-tflops", type=float, help="bf16 matmul peak that MFU is relative to (790)")
    bench_train.add_argument("--profile", action="store_true", help="also write kernel-time tables of our variants")
    bench_train.add_argument("--output-dir", default="outputs/bench-train", help="where bench_train.json/.md go")
    bench_decode = bench_kinds.add_parser(
        "decode",
        help="decode step: transformers' DeepseekV3 eager and compiled vs this project eager, fast path (bf16, FP8) "
        "and MTP: ms/step, tokens/s, peak memory, fraction of the weight+cache read floor",
    )
    add_device_options(bench_decode, "tiny shapes and grid, a CPU smoke test")
    bench_decode.add_argument("--checkpoint", help="benchmark this saved model instead of random weights")
    bench_decode.add_argument("--batch-sizes", help="comma-separated (default 1,32)")
    bench_decode.add_argument("--contexts", help="comma-separated cached tokens (default 2048,8192,32768)")
    bench_decode.add_argument(
        "--rows",
        help="comma-separated, from transformers-eager, transformers-compile, ours-eager, ours-fast, "
        "ours-fast-grouped (MoE through the grouped GEMM), ours-mtp, ours-fast-fp8 (default: all)",
    )
    bench_decode.add_argument("--steps", type=int, help="timed decode steps per cell (default 10)")
    bench_decode.add_argument("--warmup-steps", type=int, help="untimed first steps: compile, CUDA-graph capture (3)")
    bench_decode.add_argument("--mtp-contexts", help="prompt lengths of the MTP row (default 2048)")
    bench_decode.add_argument("--mtp-new-tokens", type=int, help="tokens generated in the MTP row (default 32)")
    bench_decode.add_argument(
        "--row-batch-sizes", help="per-row batch sizes, e.g. 'transformers-compile=32;ours-fast-grouped=32'"
    )
    bench_decode.add_argument("--merge", help="comma-separated bench_decode.json files of one plan: merge into one")
    bench_decode.add_argument("--output-dir", default="outputs/bench-decode", help="bench_decode.json/.md go here")
    train = commands.add_parser(
        "train", help="train with a YAML recipe (r1_zero, r1, distill): DeepSeek SFT or GRPO on TRL"
    )
    train.add_argument(
        "stage", help="the recipe's stage to run (sft, grpo, or another stage the recipe lists), or `all` in order"
    )
    train.add_argument("--recipe", required=True, help="a shipped recipe name (r1_zero, r1, distill) or a YAML path")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides: `max_steps=5` sets a field of the stage's args, `model.config.hidden_size=64` a path",
    )
    train.add_argument(
        "--num-processes",
        type=int,
        help="train on this many GPUs of this host through `accelerate launch` (default: this process only)",
    )
    train.add_argument(
        "--accelerate-config",
        default="fsdp2",
        help="with --num-processes: a shipped accelerate config (fsdp2, ddp) or a YAML path",
    )
    chat = commands.add_parser("chat", help="Gradio chat demo: streamed replies, collapsible reasoning, MTP switch")
    chat.add_argument("--model", required=True, help="checkpoint directory (the model and its tokenizer)")
    chat.add_argument("--host", default="127.0.0.1", help="interface to bind; the default serves this machine only")
    chat.add_argument("--port", type=int, help="port (default: Gradio's 7860, or the next free one)")
    chat.add_argument("--max-input-chars", type=int, default=4000, help="longer messages get a notice, no reply")
    chat.add_argument("--concurrency", type=int, default=4, help="replies generated at once; the rest queue")
    return parser


def add_device_options(parser: argparse.ArgumentParser, tiny_help: str) -> None:
    """--device, --tiny and --dtype, which every benchmark takes."""
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line) and run the chosen subcommand."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "eval":  # everything after `eval` belongs to lm-eval
        from hf_deepseek.evals.harness import run_lm_eval

        run_lm_eval(extra)
        return
    if args.command == "train" and args.num_processes:
        from hf_deepseek.trainers.launch import launch_training

        launch_training(args, extra)
        return
    if args.command == "train":  # overrides after `--recipe NAME` are left unparsed by argparse: they are extras
        from hf_deepseek.trainers.recipes import run_train_from_args

        run_train_from_args(args, extra)
        return
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "bench" and args.bench_command == "train":
        from hf_deepseek.evals.bench_train import run_train_bench_from_args

        run_train_bench_from_args(args)
    elif args.command == "bench" and args.bench_command == "decode":
        from hf_deepseek.evals.bench_decode import run_decode_bench_from_args

        run_decode_bench_from_args(args)
    elif args.command == "bench":
        from hf_deepseek.evals.bench import run_bench_from_args

        run_bench_from_args(args)
    if args.command == "chat":
        from hf_deepseek.app import run_chat_from_args

        run_chat_from_args(args)
    if args.command == "demo":
        from hf_deepseek.demo import DemoOptions, run_demo

        options = {k: v for k, v in vars(args).items() if k in DemoOptions.__dataclass_fields__}
        run_demo(DemoOptions(**options))


if __name__ == "__main__":
    main()
