"""The `hf-deepseek` command: one subcommand per job (`demo`, `train`, `eval`, `bench`, `chat`).

Each subcommand imports its module only when it runs, so `hf-deepseek --help` stays fast (no torch, transformers,
TRL or lm-eval import). A mistake on the command line (a missing model directory, an unknown option, recipe or
config key, a bad value, CUDA on a machine without it) ends in one line naming the fix and exit status 2.
"""

import argparse
import logging
import sys
from pathlib import Path

from hf_deepseek.usage_errors import UsageError

PACKAGE_DIR = Path(__file__).parent
EXAMPLE_MODEL = "checkpoints/hf-deepseek-r1-add-sub"


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (and exit status 2), without the usage block."""

    def error(self, message: str):
        fail(self.prog, f"{message} (see `{self.prog} --help`)")


def fail(prog: str, message: str):
    """Print `prog: error: message` as one line and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 4)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return value


def int_list(text: str) -> str:
    """An argparse type: comma-separated positive integers (`1,8,32`), kept as text for the benchmark plans."""
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of positive integers (e.g. 1,8,32)"
            )
    return text


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in (PACKAGE_DIR / "trainers" / "recipes").glob("*.yaml"))


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every subcommand and its options."""
    parser = OneLineParser(prog="hf-deepseek", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="the R1 story on a CPU: SFT from scratch, GRPO from the shipped SFT ancestor, lm-eval, architecture "
        "payoffs, chat command",
    )
    demo.add_argument("--recipe", default="r1_tiny", help="recipe of the miniature run (name or YAML path)")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    demo.add_argument("--sft-steps", type=int, default=120, help="SFT steps of the miniature run (0: skip stage 1)")
    demo.add_argument("--steps", "--grpo-steps", dest="grpo_steps", type=positive_int, default=18, help="GRPO steps")
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
        "lm-eval's own arguments (`hf-deepseek eval --help`); `hf-deepseek eval --list` lists the tasks",
    )
    bench = commands.add_parser(
        "bench", help="systems benchmark of this model against transformers' DeepseekV3 with the same weights"
    )
    add_device_options(bench, "tiny shapes and grid, for a CPU smoke test")
    bench.add_argument("--checkpoint", help="benchmark this saved model (weights and shapes) instead of random ones")
    bench.add_argument("--batch-sizes", type=int_list, help="comma-separated, e.g. 1,8,32")
    bench.add_argument("--contexts", type=int_list, help="comma-separated context lengths, e.g. 512,2048,8192")
    bench.add_argument("--decode-steps", type=positive_int, help="timed decode steps per (batch, context)")
    bench.add_argument("--max-tokens", type=positive_int, help="skip cells whose batch x context exceeds this")
    bench.add_argument("--output-dir", default="outputs/bench", help="where bench.json and the PNG charts go")
    bench_kinds = bench.add_subparsers(dest="bench_command", metavar="{train,decode}")
    bench_train = bench_kinds.add_parser(
        "train",
        help="training step: transformers' DeepseekV3 vs this project in bf16 and FP8: tokens/s, MFU, peak memory",
    )
    add_device_options(bench_train, "tiny shapes and every variant, a CPU smoke test")
    bench_train.add_argument("--batch-size", type=positive_int, help="sequences per step (default 8)")
    bench_train.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default 2048)")
    bench_train.add_argument("--steps", type=positive_int, help="timed steps (default 10)")
    bench_train.add_argument("--warmup-steps", type=int, help="untimed first steps: compilation, allocator (3)")
    bench_train.add_argument(
        "--variants",
        help="comma-separated, from transformers, hf_deepseek-bf16-eager, hf_deepseek-bf16, "
        "hf_deepseek-bf16-unfused-loss, hf_deepseek-fp8 (the deepseek recipe), hf_deepseek-fp8-rowwise (the rowwise "
        "recipe's defaults; the other rowwise variants start from its former choices: Inductor's quantisation, "
        "torch's grouped GEMMs, the FP8 weight gradient, and change what they name), "
        "hf_deepseek-fp8-eager, hf_deepseek-fp8-rowwise-eager, hf_deepseek-fp8-eager-fp8-wgrad, "
        "hf_deepseek-fp8-rowwise-triton-quant (Triton quantisers), hf_deepseek-fp8-rowwise-triton-quant-laid-out "
        "(the experts' inputs laid out before they are quantised), hf_deepseek-fp8-rowwise-triton-quant-precise-grads "
        "(the gradients' FP8 GEMMs without fast accumulation), hf_deepseek-fp8-rowwise-hp-wgrad and "
        "hf_deepseek-fp8-rowwise-triton-quant-hp-wgrad (the linear layers' weight gradient in bf16), "
        "hf_deepseek-fp8-rowwise-bf16-down, hf_deepseek-fp8-rowwise-dense, hf_deepseek-bf16-torch-adamw and "
        "hf_deepseek-fp8-rowwise-triton-quant-torch-adamw (torch's fused AdamW), hf_deepseek-bf16-torch-router "
        "(torch's top-k routing), hf_deepseek-fp8-rowwise-fused-mlp (the dense MLP's and shared experts' SwiGLU "
        "writing their FP8 operands), hf_deepseek-bf16-loss-chunks-16 and "
        "hf_deepseek-fp8-rowwise-triton-quant-loss-chunks-16 (the head's loss in 16 chunks), "
        "hf_deepseek-bf16-joined-projections and "
        "hf_deepseek-fp8-rowwise-triton-quant-joined-projections (q_a/kv_a and gate/up as one GEMM each), "
        "hf_deepseek-fp8-rowwise-triton-quant-fbgemm (FBGEMM's grouped GEMMs for the experts: the fbgemm extra), "
        "hf_deepseek-fp8-rowwise-triton-quant-fbgemm-hp-wgrad, "
        "hf_deepseek-fp8-rowwise-triton-quant-fbgemm-joined-projections and "
        "hf_deepseek-fp8-rowwise-triton-quant-fbgemm-hp-wgrad-joined-projections (with those choices too), "
        "hf_deepseek-fp8-rowwise-fused-moe (the rowwise recipe's default spelt out: the routed experts' SwiGLU and "
        "combine gradient writing their FP8 operands), hf_deepseek-fp8-rowwise-layer-by-layer-moe (the experts' "
        "MLP layer by layer, as before), hf_deepseek-fp8-rowwise-cached-weights (the weights quantised once per "
        "optimizer step, in its update; experts layer by layer), hf_deepseek-fp8-rowwise-cached-weights-fused-moe "
        "(both), hf_deepseek-fp8-rowwise-fbgemm-wgrad (the experts' bf16 weight gradient through FBGEMM's kernel, "
        "as before 2026-12-07; the default takes torch's grouped GEMM), hf_deepseek-fp8-rowwise-separate-projections "
        "(q_a/kv_a and gate/up as two GEMMs each; the default joins them), "
        "hf_deepseek-fp8-rowwise-linear-fp8-wgrad (the linear layers' weight gradient in FP8), "
        "hf_deepseek-fp8-rowwise-fp8-wgrads (the experts' weight gradient in FP8 too), "
        "hf_deepseek-fp8-deep-gemm (the paper's recipe with the experts' FP8 products through DeepGEMM: the "
        "deepgemm extra), hf_deepseek-fp8-deep-gemm-hp-wgrad (with Triton quantisers and the linear layers' "
        "weight gradient in bf16), hf_deepseek-fp8-fbgemm-blockwise (the paper's recipe with the experts' FP8 "
        "products through FBGEMM's blockwise grouped GEMM: the fbgemm extra) and "
        "hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad (with the linear layers' weight gradient in bf16, torch's grouped "
        "GEMM for the experts' and the projections of a shared input joined), "
        "hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad-cached-weights (and the weights' blocks written by the optimizer's "
        "update), hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad-fused-moe (or the routed experts' whole MLP in one "
        "function) and hf_deepseek-fp8-fbgemm-blockwise-hp-wgrad-cached-weights-fused-moe (both), "
        "hf_deepseek-bf16-cuda-graph and hf_deepseek-fp8-rowwise-cuda-graph (the whole step, optimizer included, "
        "captured in one CUDA graph and replayed; the plain step off CUDA) "
        "(default: transformers, hf_deepseek-bf16 and the two compiled FP8 recipes; "
        "v3-width: ours only)",
    )
    bench_train.add_argument(
        "--loss-seeds",
        type=positive_int,
        help="trajectories of the matched-loss comparison: the timed one, then more from the same initial weights "
        "over other random batches, each variant's mean loss averaged over them (default 1)",
    )
    bench_train.add_argument("--peak-tflops", type=float, help="bf16 matmul peak that MFU is relative to (790)")
    bench_train.add_argument("--profile", action="store_true", help="also write kernel-time tables of our variants")
    bench_train.add_argument("--profile-variants", help="comma-separated: profile only these variants (one step each)")
    bench_train.add_argument(
        "--shape",
        choices=("bench", "v3-width", "small"),
        help="bench: 8 layers at hidden 2048 (default); v3-width: hidden 7168; small: 4 layers at hidden 512 (a CPU "
        "comparison of bf16 with emulated FP8)",
    )
    bench_train.add_argument(
        "--num-processes",
        type=positive_int,
        help="instead: the expert-parallel training step on N GPUs of this host (torchrun) against one, each GPU "
        "with --batch-size rows; tokens/s per GPU and scaling",
    )
    bench_train.add_argument("--output-dir", default="outputs/bench-train", help="where bench_train.json/.md go")
    bench_decode = bench_kinds.add_parser(
        "decode",
        help="decode step: transformers' DeepseekV3 eager and compiled vs this project eager, fast path (bf16, FP8) "
        "and MTP: ms/step, tokens/s, peak memory, fraction of the weight+cache read floor",
    )
    add_device_options(bench_decode, "tiny shapes and grid, a CPU smoke test")
    bench_decode.add_argument("--checkpoint", help="benchmark this saved model instead of random weights")
    bench_decode.add_argument("--batch-sizes", type=int_list, help="comma-separated (default 1,32)")
    bench_decode.add_argument(
        "--contexts", type=int_list, help="comma-separated cached tokens (default 2048,8192,32768)"
    )
    bench_decode.add_argument(
        "--rows",
        help="comma-separated, from transformers-eager, transformers-compile, transformers-generate, ours-eager, "
        "ours-fast (the default fast decode path), ours-fast-grouped (MoE through the grouped GEMM), "
        "ours-fast-torch-attn (torch decode attention), ours-fast-triton-attn (Triton decode attention), "
        "ours-fast-auto-attn (Triton up to batch 8, FlashMLA above), "
        "ours-fast-cublas (bf16 dense layers on cuBLAS), ours-fast-sum-top-k (the experts' down kernel sums "
        "the top-k), ours-fast-expert-grouped (bf16 experts through the expert-grouped kernels), "
        "ours-fast-linear-rows (bf16 dense layers' 2-64 rows through the rows kernel), ours-fast-gate-up (an MLP's "
        "gate and up projections of one row in one launch), ours-fast-head-matmul (W_UK and W_UV of the decode rows "
        "through the Triton kernel), ours-fast-q-kv-a (MLA's q_a and kv_a projections of one row in one launch, the "
        "default), ours-fast-separate-q-kv-a (in two), "
        "ours-fast-norm-linear (MLA's q_a norm in the q_b projection's launch), ours-fast-fold-shared (the shared "
        "MLP in the routed experts' launches, the default), ours-fast-unfolded (the shared MLP in launches of its "
        "own), "
        "ours-fast-all-kernels (every opt-in decode kernel at once), ours-fast-alt-linear (the dense layers' "
        "matrix-vector kernels at HF_DEEPSEEK_ALT_LINEAR_GEMV_CONFIG, FP8 ones at ..._FP8_CONFIG), "
        "ours-fast-fused-attn (the Triton attention reads the roped query apart and applies W_UV itself), "
        "ours-fast-mla-front and ours-fast-fp8-mla-front (a step's kv norm, RoPE, cache write and W_UK product in "
        "one launch before the attention kernel), ours-fast-front-fused-attn (that and ours-fast-fused-attn), "
        "ours-fast-fewest-launches and ours-fast-fp8-fewest-launches (those, the q_a norm in q_b's launch and the "
        "dense MLP's gate and up in one; ours-fast-fewest-launches-pdl: with programmatic dependent launch), "
        "ours-fast-router-norm (the post-attention residual sum and norm in the router's launch; "
        "ours-fast-fewest-launches-router-norm: and the fewest-launches kernels; all of these are the default since "
        "2026-12-06), ours-fast-launches-apart and ours-fast-fp8-launches-apart (none of them: the earlier default), "
        "ours-fast-mla-chain (a batch-1 row's q_a, kv_a, q_b and MLA front in one persistent launch), "
        "ours-fast-front-one-row (the MLA front at one decode row only, the default until 2026-12-06), "
        "ours-fast-input-norm and ours-fast-fp8-head-input-norm (a layer's input norm in its q_a/kv_a launch, the "
        "default since 2026-12-06; ours-fast-separate-input-norm: apart, as before), "
        "ours-fast-trees (the step in Inductor's CUDA graphs, a step a call, instead of captured by hand), "
        "ours-fast-pdl and ours-fast-fp8-pdl (programmatic dependent launch: our kernels' and Inductor's), ours-mtp, "
        "ours-generate, ours-generate-trees (its device loop with Inductor's CUDA graphs, a step a call), "
        "ours-generate-tf-loop (transformers' token loop), ours-fast-fp8, ours-fast-fp8-alt-linear, "
        "ours-fast-fp8-separate-q-kv-a (FP8 q_a and kv_a in two launches), "
        "ours-generate-fp8, ours-fast-fp8-head and ours-generate-fp8-head (the LM head in FP8 too; "
        "ours-fast-fp8-head-separate-gate-up: the dense MLP's FP8 gate and up in two launches, as before), "
        "ours-fast-fused-experts and ours-fast-fp8-head-fused-experts (a MoE layer's gate/up and down kernels in "
        "one launch), ours-prefill and transformers-prefill (the prompts into the cache alone: a 1-token generate(), "
        "nothing compiled; prompt tokens a second) "
        "(*-generate*: generate() end to end, ms per new token; default: "
        "all); they run in the order given (the FP8 rows last: they convert the model)",
    )
    bench_decode.add_argument("--steps", type=positive_int, help="timed decode steps per cell (default 10)")
    bench_decode.add_argument("--warmup-steps", type=int, help="untimed first steps: compile, CUDA-graph capture (3)")
    bench_decode.add_argument("--mtp-contexts", help="prompt lengths of the MTP row (default 2048)")
    bench_decode.add_argument("--mtp-new-tokens", type=int, help="tokens generated in the MTP row (default 32)")
    bench_decode.add_argument(
        "--mtp-prompts", choices=["auto", "random", "task"],
        help="MTP row prompts: hfds_addition's held-out 3-digit sums in the chat template ('task', needs --checkpoint "
        "with its tokenizer), random tokens of each --mtp-contexts length ('random'); default 'auto': task for a "
        "checkpoint with a chat template, else random",
    )  # fmt: skip
    bench_decode.add_argument(
        "--generate-new-tokens", type=int, help="greedy tokens per prompt in the *-generate rows (default 128)"
    )
    bench_decode.add_argument(
        "--row-batch-sizes", help="per-row batch sizes, e.g. 'transformers-compile=32;ours-fast-grouped=32'"
    )
    bench_decode.add_argument(
        "--row-contexts", help="per-row contexts, e.g. 'ours-generate=2048;transformers-generate=2048'"
    )
    bench_decode.add_argument(
        "--profile",
        help="cells of step or generate rows to profile, e.g. 'ours-fast:1:2048,ours-generate:1:2048' "
        "(kernel tables in profile_<row>_b<batch>_c<context>.txt)",
    )
    bench_decode.add_argument("--merge", help="comma-separated bench_decode.json files of one plan: merge into one")
    bench_decode.add_argument("--output-dir", default="outputs/bench-decode", help="bench_decode.json/.md go here")
    recipes = ", ".join(shipped_recipes())
    train = commands.add_parser(
        "train",
        help=f"train with a YAML recipe ({recipes}): DeepSeek SFT or GRPO on TRL",
        description=f"Train with a YAML recipe: DeepSeek SFT or GRPO on TRL. Shipped recipes: {recipes} "
        f"(in {PACKAGE_DIR / 'trainers' / 'recipes'}). Example: hf-deepseek train sft --recipe r1_tiny max_steps=5",
    )
    train.add_argument(
        "stage", help="the recipe's stage to run (sft, grpo, or another stage the recipe lists), or `all` in order"
    )
    train.add_argument("--recipe", required=True, help=f"a shipped recipe ({recipes}) or a YAML path")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides: `max_steps=5` sets a field of the stage's args, `model.config.hidden_size=64` a path",
    )
    train.add_argument(
        "--num-processes",
        type=positive_int,
        help="train on this many GPUs of this host through `accelerate launch` (default: this process only)",
    )
    train.add_argument(
        "--expert-parallel",
        action="store_true",
        help="split each MoE layer's routed experts over the processes and shard the rest with FSDP2 (SFT stages; "
        "with --num-processes N through torchrun, or inside `torchrun --nproc-per-node N`)",
    )
    train.add_argument(
        "--accelerate-config",
        default="fsdp2",
        help="with --num-processes: a shipped accelerate config (fsdp2, ddp) or a YAML path",
    )
    chat = commands.add_parser("chat", help="Gradio chat demo: streamed replies, collapsible reasoning, MTP switch")
    chat.add_argument("--model", required=True, help="checkpoint directory (the model and its tokenizer)")
    chat.add_argument("--host", default="127.0.0.1", help="interface to bind; the default serves this machine only")
    chat.add_argument("--port", type=port_number, help="port (default: Gradio's 7860, or the next free one)")
    chat.add_argument(
        "--max-input-chars", type=positive_int, default=4000, help="longer messages get a notice, no reply"
    )
    chat.add_argument("--concurrency", type=positive_int, default=4, help="replies generated at once; the rest queue")
    return parser


def add_device_options(parser: argparse.ArgumentParser, tiny_help: str) -> None:
    """--device, --tiny and --dtype, which every benchmark takes."""
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda where there is one, else cpu)")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")


def check_model_dir(path: str | None, option: str) -> None:
    """A model directory must exist and hold a config.json."""
    if path is not None and not (Path(path) / "config.json").is_file():
        what = "no directory" if not Path(path).is_dir() else "no config.json in"
        raise UsageError(f"{what} {path!r} ({option}): give a saved model's directory, e.g. {option} {EXAMPLE_MODEL}")


def resolve_device(device: str | None) -> str:
    """The device asked for, or the one that exists (cuda if available, else cpu); refuses CUDA without CUDA."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asks for CUDA, which this machine does not have: use --device cpu")
    return device


def override_hint(args: argparse.Namespace, override: str) -> str:
    """What to write instead of a dashed recipe override: the bare `key=value`, or the field it probably meant."""
    hint = f"recipe overrides are key=value without dashes, e.g. {override}"
    if args.stage == "all":
        return hint
    from hf_deepseek.trainers.recipes import apply_overrides, check_recipe, load_recipe

    try:
        check_recipe(apply_overrides(load_recipe(args.recipe), args.stage, [override]), [args.stage])
    except UsageError as error:
        return f"recipe overrides are key=value without dashes, and {error}"
    return hint


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line) and run the chosen subcommand; usage errors exit with status 2."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(parser, argv)
    except UsageError as error:
        words = [w for w in argv[:2] if not w.startswith("-")][:1]
        fail(" ".join(["hf-deepseek", *words]), str(error))


def run(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    args, extra = parser.parse_known_args(argv)
    # bitsandbytes (imported by PEFT and TRL) warns on every CPU start that an optional 4-bit kernel is missing,
    # and `kernels` (which it asks for that kernel) that the hub is offline: neither concerns the user's command
    for noisy in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.command == "eval":  # everything after `eval` belongs to lm-eval
        from hf_deepseek.evals.harness import run_lm_eval

        run_lm_eval(extra)
        return
    if args.command == "train":
        dashed = [e for e in extra if e.startswith("-")]
        if dashed:
            raise UsageError(f"unrecognized option {dashed[0]!r}: {override_hint(args, dashed[0].lstrip('-'))}")
    if args.command == "train" and args.expert_parallel:
        import os

        from hf_deepseek.parallel.training import expert_parallel_recipe, run_expert_parallel_training

        if args.num_processes is None and "WORLD_SIZE" in os.environ:  # a torchrun worker
            run_expert_parallel_training(args, extra)
            return
        expert_parallel_recipe(args, extra, args.num_processes or 1)  # one-line errors before anything starts
    if args.command == "train" and args.num_processes:
        from hf_deepseek.trainers.launch import launch_training

        launch_training(args, extra)
        return
    from hf_deepseek import register_auto_classes

    if args.command == "train":  # overrides after `--recipe NAME` are left unparsed by argparse: they are extras
        from hf_deepseek.trainers.recipes import run_train_from_args

        register_auto_classes()
        run_train_from_args(args, extra)
        return
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "bench":
        check_model_dir(args.checkpoint, "--checkpoint")
        args.device = resolve_device(args.device)
        register_auto_classes()
    if args.command == "bench" and args.bench_command == "train" and args.num_processes:
        from hf_deepseek.evals.bench_train_parallel import run_parallel_train_bench_from_args

        run_parallel_train_bench_from_args(args)
    elif args.command == "bench" and args.bench_command == "train":
        from hf_deepseek.evals.bench_train import run_train_bench_from_args

        run_train_bench_from_args(args)
    elif args.command == "bench" and args.bench_command == "decode":
        from hf_deepseek.evals.bench_decode import run_decode_bench_from_args

        run_decode_bench_from_args(args)
    elif args.command == "bench":
        from hf_deepseek.evals.bench import run_bench_from_args

        run_bench_from_args(args)
    if args.command == "chat":
        check_model_dir(args.model, "--model")
        register_auto_classes()
        from hf_deepseek.app import run_chat_from_args

        run_chat_from_args(args)
    if args.command == "demo":
        check_model_dir(args.checkpoint, "--checkpoint")
        check_model_dir(args.sft_checkpoint, "--sft-checkpoint")
        args.device = resolve_device(args.device)
        from hf_deepseek.trainers.recipes import apply_overrides, check_recipe, load_recipe, recipe_stages

        recipe = apply_overrides(load_recipe(args.recipe), "sft", args.overrides)  # as the demo applies them
        check_recipe(recipe, recipe_stages(recipe))
        register_auto_classes()
        from hf_deepseek.demo import DemoOptions, run_demo

        options = {k: v for k, v in vars(args).items() if k in DemoOptions.__dataclass_fields__}
        run_demo(DemoOptions(**options))


if __name__ == "__main__":
    main()
