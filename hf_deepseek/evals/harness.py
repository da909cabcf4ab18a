"""lm-eval with this plugin: the `hf-deepseek eval` command and a Python entry point for in-memory models.

lm-eval loads `--model hf` checkpoints through `AutoModelForCausalLM`, which knows `model_type: hf_deepseek` only
in a process that has imported `hf_deepseek`; this module is such a process, and it puts the project's offline
tasks (`tasks/`) on lm-eval's include path. Everything else is lm-eval's own command line, with four differences
that keep a run from losing work: the model is loaded once and the tasks run one after the other, each task's
results are written as soon as it finishes, a task that fails is reported while the others complete, and each
task's generation length is capped to what fits in the model's context beside its longest prompt (with a warning
naming the task). A checkpoint whose tokenizer has a chat template is evaluated through it unless
`--no_chat_template` is given. `hf-deepseek eval --list` prints the project's tasks with their descriptions.
"""

import functools
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_deepseek.evals.task_data import TASKS_DIR
from hf_deepseek.usage_errors import UsageError, did_you_mean

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
NO_CHAT_TEMPLATE = "--no_chat_template"


def project_tasks() -> dict[str, str]:
    """The project's lm-eval tasks, name -> description, read from the task YAMLs (`task:` and the first comment)."""
    tasks = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        text = path.read_text()
        name = re.search(r"^task:\s*(\S+)", text, re.MULTILINE)
        if name is None:
            continue
        comment = re.match(r"#\s*(.*)", text)
        tasks[name.group(1)] = comment.group(1).strip() if comment else ""
    return tasks


SAMPLED_TASKS = [t for t in project_tasks() if t.endswith("_sampled")]
GREEDY_TASKS = [t for t in project_tasks() if t not in SAMPLED_TASKS]


def _go_offline() -> None:
    """Default to offline (the project's tasks and metrics need nothing from the Hub); the environment wins."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def print_task_list() -> None:
    tasks = project_tasks()
    width = max(map(len, tasks))
    print("The project's lm-eval tasks (hf-deepseek eval --tasks NAME[,NAME...]; any lm-eval task works too):")
    for name, description in tasks.items():
        print(f"  {name:<{width}}  {description}")


def run_lm_eval(argv: Sequence[str]) -> None:
    """Run lm-eval's CLI (`run` unless another subcommand is named) with the plugin loaded.

    The project's task folder is added to any `--include_path`; `--model` defaults to `hf`, whose `backend`
    defaults to `causal` (lm-eval cannot infer it for a model type transformers does not list).
    """
    argv = list(argv)
    if argv in (["--list"], ["-l"]):
        print_task_list()
        return
    if {"-h", "--help"} & set(argv):
        print(
            "hf-deepseek eval: lm-eval's command line (below) with this plugin loaded and the project's tasks on the "
            f"include path. Also: --list (the project's tasks), {NO_CHAT_TEMPLATE} (do not apply the checkpoint's "
            "chat template, which is applied by default).\n"
        )
    _go_offline()
    from lm_eval._cli import HarnessCLI

    use_template = NO_CHAT_TEMPLATE not in argv
    argv = [a for a in argv if a != NO_CHAT_TEMPLATE]
    cli = HarnessCLI()
    saved_argv = sys.argv
    sys.argv = ["hf-deepseek eval", *argv]
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved_argv
    from lm_eval.utils import setup_logging

    from hf_deepseek import register_auto_classes

    register_auto_classes()
    setup_logging()
    if hasattr(args, "include_path"):
        args.include_path = [str(TASKS_DIR), *([args.include_path] if args.include_path else [])]
    if getattr(args, "command", None) != "run" or args.model not in (None, "hf"):
        cli.execute(args)
        return
    args.model = "hf"
    args.model_args = {"backend": "causal", **(args.model_args or {})}
    failed = run_tasks_one_by_one(args, use_template)
    if failed:
        raise SystemExit(1)


def _check_pretrained(pretrained: Any) -> None:
    """A local model directory must exist; a Hub name must be in the local cache (nothing is downloaded)."""
    if not isinstance(pretrained, str) or Path(pretrained).is_dir():
        if isinstance(pretrained, str) and not (Path(pretrained) / "config.json").is_file():
            raise UsageError(f"no config.json in {pretrained!r} (--model_args pretrained=DIR): give a saved model")
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(pretrained, "config.json"), str)
    except ValueError:  # not a valid Hub name either
        cached = False
    if not cached:
        raise UsageError(
            f"no model directory {pretrained!r} (--model_args pretrained=DIR): give a saved model's directory, "
            "e.g. --model_args pretrained=checkpoints/hf-deepseek-r1-tiny"
        )


def run_tasks_one_by_one(args, use_template: bool = True) -> list[str]:
    """Load the model once, evaluate each task on its own, write its results when it finishes; returns the names
    of the tasks that failed (each reported on stderr, the others still run)."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.loggers.evaluation_tracker import sanitize_model_name
    from lm_eval.utils import handle_non_serializable, make_table

    _check_pretrained(args.model_args.get("pretrained"))
    if not hasattr(args, "apply_chat_template") and use_template:
        args.apply_chat_template = True  # decided below once the tokenizer is known
        template_by_default = True
    else:
        template_by_default = False
    cfg = EvaluatorConfig.from_cli(args)
    try:
        task_manager = cfg.process_tasks(cfg.metadata)
    except ValueError as error:
        if "Tasks not found" not in str(error):
            raise
        missing = str(error).split(":", 1)[1].strip()
        names = project_tasks()
        raise UsageError(f"unknown task {missing}{did_you_mean(missing, names)}: `hf-deepseek eval --list` lists "
                         "the project's tasks, `lm-eval ls tasks` lm-eval's") from None  # fmt: skip
    lm = context_fitting_hflm().create_from_arg_obj(
        cfg.model_args, {"batch_size": cfg.batch_size, "max_batch_size": cfg.max_batch_size, "device": cfg.device}
    )
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    if template_by_default and not has_template:
        cfg.apply_chat_template = False
    elif cfg.apply_chat_template and not has_template:
        raise UsageError("--apply_chat_template: this checkpoint's tokenizer has no chat template; leave the flag out")
    elif template_by_default:
        print(f"hf-deepseek eval: applying the checkpoint's chat template ({NO_CHAT_TEMPLATE} to turn it off)",
              file=sys.stderr)  # fmt: skip
    failed = []
    for task in cfg.tasks:
        tracker = EvaluationTracker(**{**cfg.hf_hub_log_args, "output_path": cfg.output_path})
        try:
            results = simple_evaluate(
                model=lm,
                tasks=[task],
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                log_samples=cfg.log_samples,
                evaluation_tracker=tracker,
                system_instruction=cfg.system_instruction,
                apply_chat_template=cfg.apply_chat_template,
                fewshot_as_multiturn=cfg.fewshot_as_multiturn,
                gen_kwargs=cfg.gen_kwargs,
                task_manager=task_manager,
                verbosity=cfg.verbosity,
                predict_only=cfg.predict_only,
                confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
                metadata=cfg.metadata,
            )
        except Exception as error:  # noqa: BLE001  (reported; the other tasks still run)
            failed.append(task)
            print(f"hf-deepseek eval: task {task} failed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        if results is None:  # another rank of a distributed run
            continue
        samples = results.pop("samples", None)
        tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(str(cfg.model_args["pretrained"]))
        if cfg.output_path:
            tracker.save_results_aggregated(results=results, samples=samples if cfg.log_samples else None)
            if cfg.log_samples:
                for name in results["configs"]:
                    tracker.save_results_samples(task_name=name, samples=samples[name])
        if cfg.show_config:
            print(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        print(make_table(results))
    if failed:
        done = len(cfg.tasks) - len(failed)
        print(f"hf-deepseek eval: {len(failed)} task(s) failed ({', '.join(map(str, failed))}); "
              f"{done} completed and kept their results", file=sys.stderr)  # fmt: skip
    return failed


@functools.cache
def context_fitting_hflm():
    """`ContextFittingHFLM`, built on first call (lm-eval and torch are imported then, not with this module)."""
    from lm_eval.models.huggingface import HFLM

    class ContextFittingHFLM(HFLM):
        """lm-eval's HF model with each task's generation length capped to what fits in the context beside the
        task's longest prompt (lm-eval would otherwise stop: "requested max tokens ... must be less than ...")."""

        def generate_until(self, requests, disable_tqdm: bool = False):
            longest: dict[str, int] = {}
            for request in requests:
                size = len(self.tok_encode(request.args[0]))
                longest[request.task_name] = max(longest.get(request.task_name, 0), size)
            warned = set()
            for request in requests:
                context, gen_kwargs = request.args
                task, prompt = request.task_name, longest[request.task_name]
                asked = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.max_gen_toks))
                room = max(1, self.max_length - prompt)
                if asked > room:
                    if task not in warned:
                        warned.add(task)
                        print(
                            f"hf-deepseek eval: warning: task {task} asks for {asked} generated tokens; the model's "
                            f"context is {self.max_length} and its longest prompt {prompt} tokens, so generation is "
                            f"capped at {room} tokens",
                            file=sys.stderr,
                        )
                    gen_kwargs = {k: v for k, v in gen_kwargs.items() if k != "max_new_tokens"}
                    request.arguments = (context, {**gen_kwargs, "max_gen_toks": room})
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return ContextFittingHFLM


def task_manager(include_defaults: bool = False):
    """An lm-eval TaskManager that knows the project's tasks (and lm-eval's own with `include_defaults`)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str] = GREEDY_TASKS,
    batch_size: int = 8,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate an in-memory model with lm-eval's `HFLM` and `simple_evaluate` on the project's tasks.

    Extra keyword arguments go to `lm_eval.simple_evaluate` (`limit`, `gen_kwargs`, `log_samples`, ...).
    Returns lm-eval's results dictionary.
    """
    _go_offline()
    from lm_eval import simple_evaluate

    lm = context_fitting_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(), **simple_evaluate_kwargs)
