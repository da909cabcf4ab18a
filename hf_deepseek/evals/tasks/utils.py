"""Glue between the task YAMLs in this folder and `hf_deepseek.evals`: datasets, prompts and scoring.

lm-eval imports this file by path (`!function utils.<name>`); the logic lives in the package.
"""

from datasets import Dataset, DatasetDict

from hf_deepseek.evals.scoring import score_greedy, score_samples
from hf_deepseek.evals.task_data import add_sub_set, load_rows, prompt_text

SAMPLED_KS = (1, 4, 8)


def _dataset(task: str) -> DatasetDict:
    return DatasetDict({split: Dataset.from_list(rows) for split, rows in load_rows(task).items()})


def countdown_dataset(**kwargs) -> DatasetDict:
    return _dataset("countdown")


def arithmetic_dataset(**kwargs) -> DatasetDict:
    return _dataset("arithmetic")


def addition_dataset(**kwargs) -> DatasetDict:
    return _dataset("addition")


def add_sub_dataset(rows: str = "turns", **kwargs) -> DatasetDict:
    """`add_sub` as lm-eval reads it: `test` holds one bucket's problems (`rows: add3`), a hardest bucket's larger
    set (`rows: add4_2k`) or the `turns` split; `context` (also as `fewshot`, the template's few-shot split) the
    training-side problems that open the two-turn conversations."""
    splits = load_rows("add_sub")
    test = splits["turns"] if rows == "turns" else add_sub_set(splits, rows)
    context = Dataset.from_list(splits["context"])
    return DatasetDict({"test": Dataset.from_list(test), "context": context, "fewshot": context})


def earlier_reply(doc: dict) -> str:
    """An earlier reply as the chat app sends it back: the answer alone, in its tags (the reasoning dropped)."""
    return f"<answer>{doc['answer']}</answer>"


def add_sub_greedy(doc, results):
    return score_greedy("add_sub", doc, results[0])


def gsm_symbolic_dataset(**kwargs) -> DatasetDict:
    return _dataset("gsm_symbolic")


def doc_to_text(doc: dict) -> str:
    return prompt_text(doc)


def doc_to_target(doc: dict) -> str:
    """A well-formatted reply (what a few-shot example shows): a one-line check, then the answer."""
    if "numbers" in doc:  # countdown
        check = f"{doc['answer']} = {doc['target']}"
    elif "expression" in doc:  # arithmetic
        check = f"{doc['expression']} = {doc['answer']}"
    else:
        check = f"The result is {doc['answer']}."
    return f"<think>{check}</think><answer>{doc['answer']}</answer>"


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
