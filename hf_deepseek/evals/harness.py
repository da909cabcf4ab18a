"""lm-eval with this plugin: the `hf-deepseek eval` command and a Python entry point for in-memory models.

lm-eval loads `--model hf` checkpoints through `AutoModelForCausalLM`, which knows `model_type: hf_deepseek` only
in a process that has imported `hf_deepseek`; this module is such a process, and it puts the project's offline
tasks (`tasks/`) on lm-eval's include path. Everything else is lm-eval's own command line.
"""

import os
import sys
from collections.abc import Sequence
from typing import Any

from hf_deepseek.evals.task_data import TASKS_DIR

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
GREEDY_TASKS = ["hfds_countdown", "hfds_arithmetic", "hfds_gsm_symbolic"]  # prefixed: lm-eval has its own `arithmetic`
SAMPLED_TASKS = [f"{task}_sampled" for task in GREEDY_TASKS]


def _go_offline() -> None:
    """Default to offline (the project's tasks and metrics need nothing from the Hub); the environment wins."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def run_lm_eval(argv: Sequence[str]) -> None:
    """Run lm-eval's CLI (`run` unless another subcommand is named) with the plugin loaded.

    The project's task folder is added to any `--include_path`; `--model` defaults to `hf`, whose `backend`
    defaults to `causal` (lm-eval cannot infer it for a model type transformers does not list).
    """
    _go_offline()
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import hf_deepseek  # noqa: F401  (registers the Auto classes in this process)

    setup_logging()
    cli = HarnessCLI()
    saved_argv = sys.argv
    sys.argv = ["hf-deepseek eval", *argv]
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved_argv
    if hasattr(args, "include_path"):
        args.include_path = [str(TASKS_DIR), *([args.include_path] if args.include_path else [])]
    if getattr(args, "command", None) == "run" and args.model in (None, "hf"):
        args.model = "hf"
        args.model_args = {"backend": "causal", **(args.model_args or {})}
    cli.execute(args)


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
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(), **simple_evaluate_kwargs)
