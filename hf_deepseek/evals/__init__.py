"""Evaluation: lm-eval with the plugin loaded and the project's offline reasoning tasks (`harness`, `tasks/`),
their scoring (`scoring`), an offline `evaluate` metric (`metrics/`), and the systems benchmark (`bench`).

Nothing here imports lm-eval at import time, so the benchmark runs where lm-eval is not installed.
"""
