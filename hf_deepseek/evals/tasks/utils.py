"""Glue between the task YAMLs in this folder and `hf_deepseek.evals`: datasets, prompts and scoring.

lm-eval imports this file by path (`!function utils.<name>`); the logic lives in the package.
"""

from datasets import Dataset, DatasetDict

from hf_deepseek.evals.scoring import score_greedy, score_samples
from hf_deepseek.evals.task_data import load_rows

INSTRUCTION = "Think inside <think> </think>, then give the final answer inside <answer> </answer>."
SAMPLED_KS = (1, 4, 8)


def _dataset(task: str) -> DatasetDict:
    return DatasetDict({split: Dataset.from_list(rows) for split, rows in load_rows(task).items()})


def countdown_dataset(**kwargs) -> DatasetDict:
    return _dataset("countdown")


def arithmetic_dataset(**kwargs) -> DatasetDict:
    return _dataset("arithmetic")


def gsm_symbolic_dataset(**kwargs) -> DatasetDict:
    return _dataset("gsm_symbolic")


def doc_to_text(doc: dict) -> str:
    return f"{doc['question']}\n{INSTRUCTION}\n"


def doc_to_target(doc: dict) -> str:
    return f"<answer>{doc['answer']}</answer>"


def countdown_greedy(doc, results):
    return score_greedy("countdown", doc, results[0])


def arithmetic_greedy(doc, results):
    return score_greedy("arithmetic", doc, results[0])


def gsm_symbolic_greedy(doc, results):
    return score_greedy("gsm_symbolic", doc, results[0])


def countdown_sampled(doc, results):
    return score_samples("countdown", doc, results[0], SAMPLED_KS)


def arithmetic_sampled(doc, results):
    return score_samples("arithmetic", doc, results[0], SAMPLED_KS)


def gsm_symbolic_sampled(doc, results):
    return score_samples("gsm_symbolic", doc, results[0], SAMPLED_KS)
