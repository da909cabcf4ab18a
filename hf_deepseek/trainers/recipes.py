"""Recipes as data: load a YAML recipe (`recipes/*.yaml` or a path), apply `key=value` overrides, build the stage's
model, tokenizer, dataset and rewards, and run `DeepSeekSFTTrainer` or `DeepSeekGRPOTrainer` (`hf-deepseek train`).

A recipe has top-level `output_root`, `system_prompt`, `model.config` (for a new model) and one section per stage
(`sft`, `grpo`) with `init` (`new`, another stage's name for that stage's output, or a checkpoint directory), `data`,
`args` (the stage's config fields) and, for GRPO, `rewards` / `reward_weights`. More stages of either kind are
sections with `trainer: sft|grpo`, listed in run order under `stages` (`hf-deepseek train all` runs them all).
Runs under `accelerate launch` as is.
"""

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from hf_deepseek.data.column_arithmetic import add_sub_examples
from hf_deepseek.data.r1 import SYSTEM_PROMPTS, grpo_row, prompt_messages, sft_row, sft_turn_row
from hf_deepseek.data.reasoning_tasks import task_examples
from hf_deepseek.usage_errors import UsageError, did_you_mean

RECIPES_DIR = Path(__file__).parent / "recipes"
STAGES = ("sft", "grpo")
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
logger = logging.getLogger(__name__)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A shipped recipe by name (`r1_zero`, `r1`, `distill`) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UsageError(f"no recipe {name_or_path!r}: give a YAML path or one of {', '.join(recipe_names())}")
    return yaml.safe_load(path.read_text())


def apply_overrides(recipe: dict[str, Any], stage: str, overrides: list[str]) -> dict[str, Any]:
    """Set `key=value` items (values parsed as YAML). A dotted key whose first part is a top-level key of the recipe
    is a path from the top (`grpo.data.seed=3`, `model.config.hidden_size=64`); any other key is a field of the
    stage's args (`max_steps=5`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if key.startswith("-"):
            raise UsageError(
                f"unrecognized option {item!r}: recipe overrides are key=value without dashes, e.g. {item.lstrip('-')}"
            )
        if not sep or not key:
            raise UsageError(f"override {item!r} is not key=value (e.g. max_steps=5)")
        path = key.split(".")
        if path[0] not in recipe:
            path = [stage, "args", *path]
        node = recipe
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"override {item!r}: {part!r} is not a mapping")
        node[path[-1]] = parse_value(text)
    return recipe


def parse_value(text: str) -> Any:
    """A command-line value as YAML, except where YAML 1.1 surprises: `no`/`off` stay strings
    (`save_strategy=no`) and `3e-3` is a float."""
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text
    if isinstance(value, str) and _FLOAT.fullmatch(text.strip()):
        return float(text)
    return value


def recipe_stages(recipe: dict[str, Any]) -> list[str]:
    """The recipe's stages in run order: its `stages` list, else whichever of `sft`, `grpo` it has."""
    stages = recipe.get("stages") or [s for s in STAGES if s in recipe]
    for stage in stages:
        stage_trainer(recipe, stage)
    return list(stages)


def stage_trainer(recipe: dict[str, Any], stage: str) -> str:
    """`sft` or `grpo`: the section's `trainer`, by default its name."""
    section = recipe.get(stage)
    if not isinstance(section, dict):
        names = [k for k, v in recipe.items() if isinstance(v, dict) and v.get("trainer", k) in STAGES and "args" in v]
        raise UsageError(f"this recipe has no stage {stage!r}: use one of {', '.join(names) or 'none'} (or all)")
    trainer = section.get("trainer", stage)
    if trainer not in STAGES:
        raise UsageError(f"stage {stage!r}: trainer must be one of {', '.join(STAGES)}, got {trainer!r}")
    return trainer


def check_recipe(recipe: dict[str, Any], stages: Sequence[str]) -> None:
    """Refuse unknown keys and values of the wrong type before anything is built: `model.config` keys against
    `DeepSeekConfig`, each stage's `args` against its trainer config's fields (with the closest name suggested)."""
    import dataclasses
    import inspect

    from hf_deepseek.configuration import DeepSeekConfig

    config = recipe.get("model", {}).get("config", {}) or {}
    known = set(inspect.signature(DeepSeekConfig.__init__).parameters) | set(DeepSeekConfig().to_dict())
    for key in config:
        if key not in known:
            raise UsageError(f"unknown model config key {key!r} (model.config.{key}){did_you_mean(key, known)}")
    for stage in stages:
        trainer = stage_trainer(recipe, stage)
        init = recipe[stage].get("init", "new")
        if init != "new" and not isinstance(recipe.get(init), dict) and not (Path(init) / "config.json").is_file():
            raise UsageError(
                f"{stage}.init={init!r} is neither `new`, a stage of this recipe, nor a saved model's directory "
                f"(one with a config.json): e.g. {stage}.init=checkpoints/hf-deepseek-r1-tiny-sft"
            )
        if trainer == "sft":
            from hf_deepseek.trainers.sft import DeepSeekSFTConfig as config_class
        else:
            from hf_deepseek.trainers.grpo import DeepSeekGRPOConfig as config_class
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        for key, value in (recipe[stage].get("args") or {}).items():
            if key not in fields:
                hint = did_you_mean(key, fields)
                raise UsageError(f"unknown {config_class.__name__} field {key!r} ({stage}.args.{key}){hint}")
            default = fields[key].default
            expected = next((t for t in (bool, int, float) if type(default) is t), None)
            fits = value is None or expected is None or isinstance(value, expected)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                fits = True
            if expected is int and isinstance(value, bool):
                fits = False
            if not fits:
                kind = {bool: "true or false", int: "an integer", float: "a number"}[expected]
                raise UsageError(f"{key}={value!r}: {key} takes {kind}, e.g. {key}={default!r}")


def stage_output_dir(recipe: dict[str, Any], stage: str) -> str:
    args = recipe.get(stage, {}).get("args", {})
    return args.get("output_dir") or str(Path(recipe.get("output_root", "outputs")) / stage)


def _resolve_args(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    args = dict(recipe[stage].get("args", {}))
    args["output_dir"] = stage_output_dir(recipe, stage)
    # without a GPU, several processes (`accelerate launch --multi_gpu --num_processes N`) train as one CPU job
    args.setdefault("use_cpu", not torch.cuda.is_available())
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if args.get("bf16") == "auto":
        args["bf16"] = cuda_bf16
    if "report_to" in args:
        args["report_to"] = [r for r in _as_list(args["report_to"]) if _reporter_available(r)]
    return args


def _as_list(value) -> list:
    return [] if value in (None, "none") else [value] if isinstance(value, str) else list(value)


def _reporter_available(name: str) -> bool:
    from transformers.integrations import get_available_reporting_integrations

    if name in get_available_reporting_integrations():
        return True
    logger.warning("report_to %r is not installed; metrics still go to metrics.csv and the PNG plots", name)
    return False


def build_model_and_tokenizer(recipe: dict[str, Any], stage: str):
    """A new model from `model.config` with the project's tokenizer, or a checkpoint (`init`) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM
    from hf_deepseek.data import build_tokenizer

    init = recipe[stage].get("init", "new")
    if init == "new":
        tokenizer = build_tokenizer()
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = DeepSeekConfig(**{**recipe.get("model", {}).get("config", {}), "vocab_size": len(tokenizer), **ids})
        torch.manual_seed(recipe[stage].get("args", {}).get("seed", 42))
        return DeepSeekForCausalLM(config), tokenizer
    path = stage_output_dir(recipe, init) if isinstance(recipe.get(init), dict) else init
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _problems(data: dict[str, Any]):
    """The stage's problems: `data.tasks` (task -> count) at `data.seed`; for `add_sub`, `data.buckets` narrows the
    buckets, `data.bucket_weights` (bucket -> weight) sets their shares and `data.varied: false` asks all its
    questions as `Calculate a + b.`."""
    seed = data.get("seed", 0)
    for task, count in data["tasks"].items():
        if task == "add_sub" and (data.get("buckets") or data.get("bucket_weights")):
            weights = data.get("bucket_weights")
            buckets = tuple(data.get("buckets") or weights)
            yield from add_sub_examples(count, seed, buckets=buckets, varied=data.get("varied", True), weights=weights)
        else:
            yield from task_examples(task, count, seed)


def with_history(data: dict[str, Any], problems: list[dict[str, Any]]) -> list[tuple[dict, list[dict]]]:
    """Pair each problem with the earlier exchanges of its conversation: with `data.multi_turn` (a share of rows),
    that share gets 1 to `data.max_earlier_turns` (default 2) other problems of the set before it."""
    import random

    share, most = data.get("multi_turn", 0.0), data.get("max_earlier_turns", 2)
    rng = random.Random(data.get("seed", 0) + 7919)
    return [(p, rng.sample(problems, rng.randint(1, most)) if share and rng.random() < share else []) for p in problems]


def trace_turn_row(trace: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    """A kept trace as a conversational prompt-completion SFT row, like the cold start's `sft_turn_row`: the
    conversation (the trace's `history` exchanges as the chat sends them, then its question) as `prompt`, the
    teacher's reply as `completion`."""
    return {
        "prompt": prompt_messages(trace["question"], system_prompt, trace.get("history") or ()),
        "completion": [{"role": "assistant", "content": trace["completion"]}],
    }


def build_dataset(recipe: dict[str, Any], stage: str):
    """The stage's dataset: `cold_start` (SFT rows with worked solutions), `problems` (GRPO prompts and reward
    columns), `traces` (SFT on checked teacher traces), or R1-Zero's `plain_text` (pretraining documents) and
    `zero_problems` (plain-text prompts that open `<think>`). With `data.multi_turn` some rows are later turns of a
    conversation (`with_history`); such cold-start and traces rows are prompt-completion rows (loss on the last reply
    only). A traces `data.teacher` is a model directory or another stage of the recipe (its output)."""
    from datasets import Dataset

    data = recipe[stage]["data"]
    system_prompt = SYSTEM_PROMPTS[recipe.get("system_prompt", "none") or "none"]
    kind = data["kind"]
    if kind == "cold_start" and data.get("multi_turn"):
        rows = with_history(data, list(_problems(data)))
        return Dataset.from_list([sft_turn_row(p, system_prompt, history) for p, history in rows])
    if kind == "cold_start":
        return Dataset.from_list([sft_row(p, system_prompt) for p in _problems(data)])
    if kind == "plain_text":  # R1-Zero's base model: documents without tags or chat roles
        import random

        from hf_deepseek.data.r1_zero import pretraining_text

        rng = random.Random(data.get("seed", 0))
        worked, tagged = data.get("worked_share", 0.5), data.get("tagged_share", 0.0)
        lead = data.get("lead_share", 0.0)
        return Dataset.from_list([{"text": pretraining_text(p, rng, worked, tagged, lead)} for p in _problems(data)])
    if kind == "zero_problems":  # R1-Zero's GRPO prompts: plain text that opens the thinking block
        from hf_deepseek.data.r1_zero import zero_prompt

        return Dataset.from_list([{**grpo_row(p), "prompt": zero_prompt(p["question"])} for p in _problems(data)])
    if kind == "problems":
        rows = with_history(data, list(_problems(data)))
        return Dataset.from_list([grpo_row(p, system_prompt, history) for p, history in rows])
    if kind == "traces":
        from hf_deepseek.trainers.distill import generate_traces, load_traces

        path = Path(recipe.get("output_root", "outputs")) / data["path"]
        if not path.is_file():
            teacher = data.get("teacher")
            if not teacher:
                raise ValueError(f"no traces at {path}: write them there or set {stage}.data.teacher=DIR")
            if isinstance(recipe.get(teacher), dict):  # another stage of the recipe: its output
                teacher = stage_output_dir(recipe, teacher)
            options = {k: data[k] for k in ("samples_per_problem", "max_new_tokens", "problems_per_batch") if k in data}
            problems = _problems(data)
            if data.get("multi_turn"):  # some problems are asked after earlier exchanges, kept in their traces
                problems = (
                    {**p, "history": [{"question": e["question"], "answer": e["answer"]} for e in history]}
                    if history
                    else p
                    for p, history in with_history(data, list(problems))
                )
            generate_traces(teacher, problems, path, system_prompt=system_prompt, **options)
        traces = load_traces(path)
        if not traces:
            raise ValueError(f"no well-formatted, correct trace in {path}")
        if data.get("multi_turn") or any(row.get("history") for row in traces):
            return Dataset.from_list([trace_turn_row(row, system_prompt) for row in traces])
        rows = [
            {"messages": [*prompt_messages(row["question"], system_prompt), {"role": "assistant", "content": text}]}
            for row in traces
            for text in [row["completion"]]
        ]
        return Dataset.from_list(rows)
    raise ValueError(f"unknown data kind {kind!r}: cold_start, problems or traces")


def run_stage(stage: str, recipe: dict[str, Any], callbacks: Sequence[Any] = ()):
    """Train one stage, save the final model and tokenizer to its output_dir, write metrics.csv and plots/*.png.
    Extra `callbacks` join the trainer's; a `ProgressCallback` among them replaces the Trainer's own progress bar
    and printed logs (`hf-deepseek demo` narrates with it). Returns the trainer."""
    from transformers import PrinterCallback, ProgressCallback

    from hf_deepseek.trainers.plotting import MetricsPlotCallback

    trainer_kind = stage_trainer(recipe, stage)
    args = _resolve_args(recipe, stage)
    model, tokenizer = build_model_and_tokenizer(recipe, stage)
    dataset = build_dataset(recipe, stage)
    plots = [MetricsPlotCallback(args["output_dir"])]
    if trainer_kind == "sft":
        from hf_deepseek.trainers.sft import DeepSeekSFTConfig, DeepSeekSFTTrainer

        trainer = DeepSeekSFTTrainer(
            model=model,
            args=DeepSeekSFTConfig(**args),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=plots,
        )
    else:
        from hf_deepseek.trainers.grpo import DeepSeekGRPOConfig, DeepSeekGRPOTrainer
        from hf_deepseek.trainers.rewards import get_reward_funcs

        section = recipe[stage]
        if "reward_weights" in section:
            args.setdefault("reward_weights", section["reward_weights"])
        trainer = DeepSeekGRPOTrainer(
            model=model,
            reward_funcs=get_reward_funcs(section.get("rewards", ["accuracy", "format"])),
            args=DeepSeekGRPOConfig(**args),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=plots,
        )
    for callback in callbacks:
        if isinstance(callback, ProgressCallback):
            trainer.remove_callback(ProgressCallback)
            trainer.remove_callback(PrinterCallback)
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=args.get("resume_from_checkpoint"))
    trainer.save_model(args["output_dir"])
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args["output_dir"])
    return trainer


def run_train_from_args(args, extra: list[str] = ()) -> None:
    """The `hf-deepseek train` subcommand: `args.stage`, `args.recipe`, and the overrides in `args.overrides`
    and `extra` (what argparse left over)."""
    from hf_deepseek import register_auto_classes

    register_auto_classes()  # registers the Auto classes, so checkpoints reload

    recipe = load_recipe(args.recipe)
    overrides = [*args.overrides, *extra]
    if args.stage == "all":
        stages = recipe_stages(recipe)
        bare = [o for o in overrides if o.partition("=")[0].split(".")[0] not in recipe]
        if bare:
            raise UsageError(f"with `all`, name the stage in each override ({stages[-1]}.args.max_steps=5): {bare}")
    else:
        stages = [args.stage]
    recipe = apply_overrides(recipe, stages[0], overrides)
    check_recipe(recipe, stages)
    histories = []
    for stage in stages:
        trainer = run_stage(stage, recipe)
        histories.append((stage, stage_trainer(recipe, stage), trainer.state.log_history))
        if trainer.is_world_process_zero():
            out = trainer.args.output_dir
            print(f"{stage}: saved model and tokenizer to {out}; metrics in {out}/metrics.csv, plots in {out}/plots/")
    if len(stages) > 1 and trainer.is_world_process_zero():
        from hf_deepseek.trainers.plotting import plot_stage_curves

        path = plot_stage_curves(histories, Path(recipe.get("output_root", "outputs")) / "training_curves.png")
        print(f"curves of all stages: {path}")
