"""`python -m hf_deepseek.evals.tasks` prints this folder, the `--include_path` that gives plain `lm_eval` the
project's tasks: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks hfds_addition
--include_path "$(python -m hf_deepseek.evals.tasks)"`."""

from pathlib import Path

print(Path(__file__).resolve().parent)
