"""pass@k (unbiased estimator), maj@n and format compliance for the project's reasoning tasks, as an `evaluate`
metric that loads from this file (`hf_deepseek.evals.metrics.load_metric("pass_at_k")`), never from the Hub."""

import json

import datasets
import evaluate

from hf_deepseek.evals.scoring import score_samples

_DESCRIPTION = """For each problem, n sampled completions are scored: answers are taken from <answer>...</answer>
(with a fallback), checked against the reference (Countdown: a valid expression reaching the target; other tasks:
the same number), and reduced to pass@k = 1 - C(n-c, k) / C(n, k), maj@n (majority vote over the n answers) and
the share of completions in the <think>...</think><answer>...</answer> format; then averaged over problems."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of completions (n per problem, the same n for all).
    references: list of JSON strings, the task's rows (`question`, `answer`, and for Countdown `numbers`, `target`).
    task: "countdown", "arithmetic" or "gsm_symbolic".
    k: list of k values for pass@k (each <= n); default [1].
Returns:
    dict with "pass@k" for each k, "maj@n" and "format", each the mean over problems.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Chen et al., Evaluating Large Language Models Trained on Code, 2021 (the pass@k estimator).",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, task: str = "arithmetic", k: list[int] | None = None):
        per_problem = [
            score_samples(task, json.loads(reference), completions, k or [1])
            for completions, reference in zip(predictions, references, strict=True)
        ]
        return {name: sum(s[name] for s in per_problem) / len(per_problem) for name in per_problem[0]}
