"""Training problems for the verifiable tasks, drawn from reasoning-gym (offline, procedural, deterministic).

`task_examples(task, n, seed)` yields problems of `countdown`, `arithmetic` (reasoning-gym's `basic_arithmetic`),
`gsm_symbolic`, `addition` and `add_sub` (this package's own generators: `add_sub` is 1- to 4-digit addition and
subtraction, `hf_deepseek.data.column_arithmetic`), with the same option ranges and the same problem
keys as the held-out evaluation sets (`hf_deepseek.evals.task_data`). A problem is yielded only if every one of
its keys hashes to the requested side of `split_of`, so training never sees an evaluation problem.
"""

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from hf_deepseek.data.column_arithmetic import add_sub_examples, problem_key
from hf_deepseek.data.expressions import countdown_value
from hf_deepseek.data.tasks import Split, _check_split, addition_examples, split_of

TASKS = ("countdown", "arithmetic", "gsm_symbolic", "addition", "add_sub")
GYM_DATASETS = {"countdown": "countdown", "arithmetic": "basic_arithmetic", "gsm_symbolic": "gsm_symbolic"}
GYM_OPTIONS: dict[str, dict[str, Any]] = {
    "countdown": dict(min_numbers=3, max_numbers=4, min_value=1, max_value=20, min_target=1, max_target=100),
    "arithmetic": dict(
        min_terms=2, max_terms=3, min_digits=1, max_digits=3, operators=("+", "-", "*"), allow_negation=False
    ),
    "gsm_symbolic": {},
}


def problem_keys(task: str, example: dict[str, Any]) -> list[str]:
    """The names of a problem for the split hash (the evaluation sets use the same ones)."""
    if task == "countdown":
        return [f"countdown:{sorted(example['numbers'])}->{example['target']}"]
    if task == "arithmetic":
        expression = example["expression"].replace(" ", "")
        keys = [f"arithmetic:{expression}"]
        terms = expression.split("+")
        if len(terms) == 2 and all(t.isdigit() for t in terms):  # a plain sum, also made by addition_examples
            a, b = sorted(int(t) for t in terms)
            keys.append(f"add:{a}+{b}")
        return keys
    if task == "gsm_symbolic":
        return [f"gsm_symbolic:{example['question']}"]
    if task == "addition":
        a, b = sorted(int(t) for t in example["expression"].split("+"))
        return [f"add:{a}+{b}"]
    if task == "add_sub":
        expression = example["expression"]
        op, (a, b) = ("add", expression.split("+")) if "+" in expression else ("sub", expression.split("-"))
        return [problem_key(op, int(a), int(b))]
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """An expression that uses each number once with + - * / (no unary minus) and equals `target`, or None."""
    precedence = {"+": 1, "-": 1, "*": 2, "/": 2}

    def combine(left: tuple, op: str, right: tuple) -> tuple[Fraction, str, int]:
        (a, ta, pa), (b, tb, pb) = left, right
        p = precedence[op]
        ta = f"({ta})" if pa < p else ta
        tb = f"({tb})" if pb < p or (pb == p and op in "-/") else tb
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        return value, f"{ta} {op} {tb}" if p == 1 else f"{ta}{op}{tb}", p

    def search(terms: list[tuple[Fraction, str, int]]) -> str | None:
        if len(terms) == 1:
            return terms[0][1] if terms[0][0] == target else None
        for i, j in ((i, j) for i in range(len(terms)) for j in range(len(terms)) if i != j):
            rest = [t for k, t in enumerate(terms) if k not in (i, j)]
            for op in "+-*/":
                combined = combine(terms[i], op, terms[j])
                if combined[0] is not None and (found := search([*rest, combined])):
                    return found
        return None

    return search([(Fraction(x), str(x), 3) for x in numbers])


def _from_gym(task: str, item: dict[str, Any]) -> dict[str, Any]:
    meta = item["metadata"]
    if task == "countdown":
        numbers, target = meta["numbers"], meta["target"]
        # the question of hf_deepseek.data.countdown_examples and of the evaluation set
        question = f"Use {' '.join(map(str, numbers))} to make {target}."
        answer = item["answer"]
        if countdown_value(answer, numbers) != target:  # reasoning-gym's answer may start with a unary minus
            answer = solve_countdown(numbers, target)
        return {"question": question, "answer": answer, "numbers": numbers, "target": target}
    if task == "arithmetic":
        return {"question": item["question"], "answer": item["answer"], "expression": meta["expression"]}
    cot = meta.get("answer_cot", "")
    return {"question": item["question"], "answer": item["answer"], "solution": cot.split("####")[0].strip()}


def task_examples(task: str, n: int, seed: int, split: Split = "train") -> Iterator[dict[str, Any]]:
    """Yield `n` distinct problems of `task` on `split`'s side of the hash, deterministic in `seed`.

    Each is a dict with `task`, `question`, `answer` (a reference answer) and the task's own fields:
    `numbers`/`target` (countdown), `expression` (arithmetic, addition), `solution` (gsm_symbolic's worked steps).
    """
    _check_split(split)
    if task == "addition":
        for example in addition_examples(n, seed, digits=3, split=split):
            expression = example["prompt"].removesuffix("=")
            question = f"Calculate {expression.replace('+', ' + ')}."
            yield {"task": task, "question": question, "answer": example["answer"], "expression": expression}
        return
    if task == "add_sub":
        yield from add_sub_examples(n, seed, split)
        return
    if task not in GYM_DATASETS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(GYM_DATASETS[task], seed=seed, size=10**8, **GYM_OPTIONS[task])
    seen: set[str] = set()
    index = produced = 0
    while produced < n:
        example = {"task": task, **_from_gym(task, dataset[index])}
        index += 1
        keys = problem_keys(task, example)
        if example["answer"] is None or keys[0] in seen or any(split_of(key) != split for key in keys):
            continue
        seen.add(keys[0])
        produced += 1
        yield example
