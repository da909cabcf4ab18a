"""The offline evaluation sets: Countdown, multi-digit arithmetic and GSM-style word problems from reasoning-gym,
written once to JSONL files that ship with the package (`tasks/*.jsonl`) and read by the lm-eval task YAMLs.

Held out from training by construction: a problem enters the `test` split only if every key that names it (the
same keys `hf_deepseek.data` uses, e.g. `countdown:[3, 7, 25]->46`, `add:12+34`) hashes to the test side of
`hf_deepseek.data.split_of`, the split the trainers' generators never draw from; and reasoning-gym is seeded at
`EVAL_SEED`, far from the small seeds training runs use (its item i comes from `Random(seed + i)`).
Rebuild the files with `python -m hf_deepseek.evals.task_data` (deterministic: same files on every machine).
"""

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_deepseek.data import addition_examples, split_of
from hf_deepseek.data.column_arithmetic import BUCKETS, add_sub_examples, bucket_problems, problem_key
from hf_deepseek.data.reasoning_tasks import GYM_DATASETS, GYM_OPTIONS, problem_keys

TASKS_DIR = Path(__file__).parent / "tasks"
INSTRUCTION = "Think inside <think> </think>, then give the final answer inside <answer> </answer>."
EVAL_SEED = 1_000_000_000
FEWSHOT_SEED = 1_500_000_000
SPLIT_SIZES = {"test": 500, "fewshot": 8}


def countdown_row(item: dict[str, Any]) -> dict[str, Any]:
    numbers, target = item["metadata"]["numbers"], item["metadata"]["target"]
    # the prompt of hf_deepseek.data.countdown_examples, so models trained on it see a familiar question
    return {
        "question": f"Use {' '.join(map(str, numbers))} to make {target}.",
        "answer": item["answer"],
        "numbers": numbers,
        "target": target,
    }


def arithmetic_row(item: dict[str, Any]) -> dict[str, Any]:
    return {"question": item["question"], "answer": item["answer"], "expression": item["metadata"]["expression"]}


def gsm_row(item: dict[str, Any]) -> dict[str, Any]:
    return {"question": item["question"], "answer": item["answer"]}


@dataclass(frozen=True)
class TaskSource:
    """How one task is drawn from reasoning-gym and how its problems are named for the split hash: the dataset,
    its options and the keys are the trainers' own (`hf_deepseek.data.reasoning_tasks`), so the two cannot drift."""

    task: str
    row: Callable[[dict[str, Any]], dict[str, Any]]

    @property
    def dataset(self) -> str:
        return GYM_DATASETS[self.task]

    @property
    def options(self) -> dict[str, Any]:
        return GYM_OPTIONS[self.task]

    def keys(self, row: dict[str, Any]) -> list[str]:
        return problem_keys(self.task, row)


SOURCES = {
    "countdown": TaskSource("countdown", countdown_row),
    "arithmetic": TaskSource("arithmetic", arithmetic_row),
    "gsm_symbolic": TaskSource("gsm_symbolic", gsm_row),
}


def split_seed(split: str) -> int:
    return EVAL_SEED if split == "test" else FEWSHOT_SEED


def row_at(task: str, split: str, index: int) -> dict[str, Any]:
    """The row reasoning-gym's item `index` becomes (before the split filter), tagged with its source index."""
    import reasoning_gym

    source = SOURCES[task]
    dataset = reasoning_gym.create_dataset(source.dataset, seed=split_seed(split), size=index + 1, **source.options)
    return {"source_index": index, **source.row(dataset[index])}


def generate_rows(task: str, split: str, size: int) -> Iterator[dict[str, Any]]:
    """`size` distinct problems for `split`: `test` keeps only problems on the test side of the split hash,
    `fewshot` (the examples shown in few-shot prompts) only problems on the train side."""
    import reasoning_gym

    source = SOURCES[task]
    wanted = "test" if split == "test" else "train"
    # reasoning-gym's item i depends only on (seed, i); some datasets precompute per-item state up to `size`
    candidates = 1000 + 40 * size
    dataset = reasoning_gym.create_dataset(source.dataset, seed=split_seed(split), size=candidates, **source.options)
    seen: set[str] = set()
    index = produced = 0
    while produced < size:
        if index == candidates:
            raise RuntimeError(f"{task}: only {produced} of {size} {split} problems in {candidates} candidates")
        row = {"source_index": index, **source.row(dataset[index])}
        index += 1
        keys = source.keys(row)
        if keys[0] in seen or any(split_of(key) != wanted for key in keys):
            continue
        seen.add(keys[0])
        produced += 1
        yield row


def addition_rows(split: str, size: int) -> Iterator[dict[str, Any]]:
    """`size` 3-digit sums (`Calculate 123 + 456.`, the trainers' `addition` task), drawn by the project's own
    generator at the split's seed; `test` keeps only sums on the test side of the split hash (key `add:a+b`)."""
    wanted = "test" if split == "test" else "train"
    for example in addition_examples(size, seed=split_seed(split), digits=3, split=wanted):
        expression = example["prompt"].removesuffix("=")
        yield {
            "question": f"Calculate {expression.replace('+', ' + ')}.",
            "answer": example["answer"],
            "expression": expression,
        }


ADD_SUB_TEST_PER_BUCKET = 500
ADD_SUB_TURNS = 500  # problems asked as the second turn of a two-turn conversation, and alone
# the hardest buckets' larger sets (`add4_2k`, `sub4_2k`): at ~96% pass@1 a 500-problem Wilson interval is about
# +-1.7 points, too wide to separate a GRPO model from its ancestor; 2,000 problems make it about +-0.9
ADD_SUB_LARGE = {"add4": 2000, "sub4": 2000}


def add_sub_rows() -> Iterator[dict[str, Any]]:
    """The `add_sub` evaluation set (`Calculate a + b.` / `Calculate a - b.`): per bucket (`add1` ... `sub4`) 500
    held-out problems (all 100 for the 1-digit buckets, which training covers whole); a `turns` split of 500 of them
    (an equal share of each bucket) for the first-turn / second-turn comparison; a `context` split of training-side
    problems that serve as the earlier exchange of the two-turn conversations; and a `test_more` split, the next
    distinct held-out problems of the same draw for the buckets of `ADD_SUB_LARGE` (ids continue the bucket's
    numbering), so that the bucket's 500 and these make its larger set (`add4_2k`: 2,000 problems)."""
    turns_per_bucket = -(-ADD_SUB_TURNS // len(BUCKETS))
    turns, more = [], []
    for bucket in BUCKETS:
        if bucket.endswith("1"):
            rows = bucket_problems(bucket)
        else:
            seed, seen, rows = EVAL_SEED + BUCKETS.index(bucket), set(), []
            wanted = ADD_SUB_LARGE.get(bucket, ADD_SUB_TEST_PER_BUCKET)
            keys = set()  # past the first 500, distinct by the split hash's name too (`a + b` and `b + a` are one)
            for row in add_sub_examples(10**6, seed, "test", (bucket,), varied=False):  # distinct problems
                key = problem_key(bucket[:3], *map(int, row["expression"].replace("+", "-").split("-")))
                if row["expression"] not in seen and (len(rows) < ADD_SUB_TEST_PER_BUCKET or key not in keys):
                    seen.add(row["expression"])
                    keys.add(key)
                    rows.append(row)
                if len(rows) == wanted:
                    break
            more += [(bucket, i, row) for i, row in enumerate(rows) if i >= ADD_SUB_TEST_PER_BUCKET]
            rows = rows[:ADD_SUB_TEST_PER_BUCKET]
        for i, row in enumerate(rows):
            yield {"id": f"add_sub-{bucket}-{i:04d}", "split": "test", **row}
        turns += random.Random(EVAL_SEED).sample(rows, turns_per_bucket)
    for i, row in enumerate(turns[:ADD_SUB_TURNS]):
        yield {"id": f"add_sub-turns-{i:04d}", "split": "turns", **row}
    for i, row in enumerate(add_sub_examples(ADD_SUB_TURNS, FEWSHOT_SEED, "train", varied=False)):
        yield {"id": f"add_sub-context-{i:04d}", "split": "context", **row}
    for bucket, i, row in more:
        yield {"id": f"add_sub-{bucket}-{i:04d}", "split": "test_more", **row}


def add_sub_set(splits: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    """One bucket's evaluation problems from `load_rows("add_sub")`: `add4` its 500 (100 for 1-digit buckets),
    `add4_2k` those and the `test_more` ones after them (the buckets of `ADD_SUB_LARGE`)."""
    bucket, large = name.removesuffix("_2k"), name.endswith("_2k")
    rows = [r for r in splits["test"] if r["bucket"] == bucket]
    if large:
        if bucket not in ADD_SUB_LARGE:
            raise ValueError(f"no larger set for {bucket}: {sorted(ADD_SUB_LARGE)}")
        rows += [r for r in splits["test_more"] if r["bucket"] == bucket]
    return rows


def data_file(task: str) -> Path:
    return TASKS_DIR / f"{task}.jsonl"


def write_task_files(sizes: dict[str, int] = SPLIT_SIZES) -> list[Path]:
    """Regenerate every task's JSONL (one row per line, with its `split` and a stable `id`)."""
    paths = []
    for task in SOURCES:
        with data_file(task).open("w") as out:
            for split, size in sizes.items():
                for i, row in enumerate(generate_rows(task, split, size)):
                    out.write(json.dumps({"id": f"{task}-{split}-{i:04d}", "split": split, **row}) + "\n")
        paths.append(data_file(task))
    with data_file("addition").open("w") as out:
        for split, size in sizes.items():
            for i, row in enumerate(addition_rows(split, size)):
                out.write(json.dumps({"id": f"addition-{split}-{i:04d}", "split": split, **row}) + "\n")
    paths.append(data_file("addition"))
    with data_file("add_sub").open("w") as out:
        for row in add_sub_rows():
            out.write(json.dumps(row) + "\n")
    paths.append(data_file("add_sub"))
    return paths


def prompt_text(row: dict[str, Any]) -> str:
    """The prompt a model sees for a problem (the tasks' `doc_to_text`): the question, then the format to use."""
    return f"{row['question']}\n{INSTRUCTION}\n"


def load_rows(task: str) -> dict[str, list[dict[str, Any]]]:
    """The shipped rows of a task, grouped by split."""
    rows: dict[str, list[dict[str, Any]]] = {}
    with data_file(task).open() as lines:
        for line in lines:
            row = json.loads(line)
            rows.setdefault(row.pop("split"), []).append(row)
    return rows


if __name__ == "__main__":
    for path in write_task_files():
        print(f"wrote {path}")
