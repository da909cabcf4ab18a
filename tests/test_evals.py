"""hf_deepseek.evals: the `hf-deepseek eval` command, the offline reasoning tasks inside lm-eval, their scoring
(pass@k, maj@k, format) against an oracle model, batched == single generation, held-out data, offline metrics."""

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.data import addition_examples, build_tokenizer, countdown_examples, split_of, verify_countdown
from hf_deepseek.evals import scoring
from hf_deepseek.evals.scoring import (
    canonical_answer,
    extract_answer,
    is_correct,
    is_well_formatted,
    majority_vote,
    pass_at_k,
    score_samples,
)
from hf_deepseek.evals.task_data import EVAL_SEED, SOURCES, SPLIT_SIZES, load_rows, row_at

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402

from hf_deepseek.evals.harness import evaluate_model, task_manager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = list(SOURCES)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def char_model(tokenizer, seed: int = 0, dtype=torch.float32) -> DeepSeekForCausalLM:
    """A tiny model over the character tokenizer, with O(1)-scale weights so that greedy outputs vary."""
    torch.manual_seed(seed)
    config = tiny_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=1024,
    )
    model = DeepSeekForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    return model


# ---------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("task", "completion", "expected"),
    [
        ("arithmetic", "<think>2+2</think><answer>4</answer>", "4"),
        ("arithmetic", "<answer>3</answer> then <answer> 5 </answer>", "5"),  # the last complete tag wins
        ("arithmetic", "so 12 + 30 = 42", "42"),  # fallback: the last number
        ("gsm_symbolic", "She pays $1,234.50 in total.", "1,234.50"),
        ("arithmetic", "<answer>7", "7"),  # unclosed tag: fallback
        ("arithmetic", "no digits here", None),
        ("countdown", "<think>try</think><answer>(25-7)*3</answer>", "(25-7)*3"),
        ("countdown", "I get 25 - 7 = 18, then (25 - 7) * 3", "(25 - 7) * 3"),  # fallback: the last expression
        ("countdown", "nothing", None),
    ],
)
def test_extract_answer(task, completion, expected):
    assert extract_answer(task, completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think><answer>1</answer>", True),
        ("  <think>\nstep\n</think>\n<answer> 1 </answer>\n", True),
        ("<think></think><answer>1</answer>", True),
        ("<answer>1</answer>", False),  # no reasoning block
        ("<think>a</think><answer> </answer>", False),  # empty answer
        ("<think>a</think>text<answer>1</answer>", False),  # text between the blocks
        ("<think>a</think><answer>1</answer> trailing", False),
        ("<think>a<think>b</think><answer>1</answer>", False),  # nested tag
        ("<think>a</think><answer>1</answer><answer>2</answer>", False),  # two answers
    ],
)
def test_format_compliance(completion, expected):
    assert is_well_formatted(completion) is expected


def test_correctness_per_task():
    doc = {"answer": "-1234", "question": ""}
    assert is_correct("arithmetic", "-1,234", doc) and is_correct("arithmetic", "-1234.0", doc)
    assert not is_correct("arithmetic", "1234", doc) and not is_correct("arithmetic", None, doc)
    assert is_correct("gsm_symbolic", "$12.50", {"answer": "12.5"})
    assert is_correct("gsm_symbolic", r"\frac{25}{2}", {"answer": "12.5"})  # math-verify fallback
    assert not is_correct("gsm_symbolic", "twelve", {"answer": "12"})
    countdown = {"answer": "(25-7)*3", "numbers": [3, 7, 25], "target": 54}
    assert is_correct("countdown", "3*(25-7)", countdown)  # any valid expression, not only the reference
    assert is_correct("countdown", "(25 - 7) * 3 = 54", countdown)  # the restated target is ignored
    assert not is_correct("countdown", "25*3-21", countdown)  # 21 is not one of the numbers
    assert not is_correct("countdown", "9" * 300, countdown)  # absurdly long answers are refused fast


def test_canonical_answers_group_equivalent_answers():
    assert canonical_answer("arithmetic", "1,000") == canonical_answer("arithmetic", "1000.0")
    assert canonical_answer("countdown", "3*(25-7)") == canonical_answer("countdown", "(25 - 7)*3 = 54")
    assert canonical_answer("countdown", "25+7+3") != canonical_answer("countdown", "25*3-7")
    assert canonical_answer("countdown", "not an expression") == "not an expression"
    assert canonical_answer("arithmetic", None) is None


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """Share of all k-subsets of the samples that hold at least one correct sample (the definition of pass@k)."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_estimator_equals_its_definition(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(correct, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(n, n + 1, 1)


def test_majority_vote_ties_go_to_the_earliest_answer():
    assert majority_vote([None, "a", "b", "b", "a"]) == 1
    assert majority_vote(["a", "b", "b"]) == 1
    assert majority_vote([None, None]) is None


# ---------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("task", TASKS)
def test_shipped_data_is_held_out_and_well_formed(task):
    rows = load_rows(task)
    assert {split: len(r) for split, r in rows.items()} == SPLIT_SIZES
    keys = {split: [SOURCES[task].keys(row) for row in r] for split, r in rows.items()}
    # every name of every test problem hashes to the test side of the split the trainers' generators filter on
    assert all(split_of(key) == "test" for names in keys["test"] for key in names)
    assert all(split_of(key) == "train" for names in keys["fewshot"] for key in names)
    firsts = [names[0] for names in keys["test"]]
    assert len(set(firsts)) == len(firsts)
    assert len({row["id"] for split in rows.values() for row in split}) == sum(SPLIT_SIZES.values())
    for row in rows["test"]:
        if task == "countdown":
            assert verify_countdown(row["answer"], row["numbers"], row["target"])
        else:
            assert scoring.parse_number(row["answer"]) is not None


@pytest.mark.parametrize("task", TASKS)
def test_shipped_data_regenerates_identically(task):
    """The JSONL is reasoning-gym's output at fixed seeds: sampled rows regenerate exactly."""
    rows = load_rows(task)
    for split in rows:
        for row in random.Random(0).sample(rows[split], 4):
            expected = {k: v for k, v in row.items() if k != "id"}
            assert row_at(task, split, row["source_index"]) == expected


def test_test_problems_never_appear_in_training_data():
    """Draw a lot of training data from the trainers' generators (several seeds) and look for eval problems."""
    countdown_test = {(tuple(sorted(r["numbers"])), r["target"]) for r in load_rows("countdown")["test"]}
    for seed in range(3):
        for num_numbers in (3, 4):
            for example in countdown_examples(3000, seed=seed, num_numbers=num_numbers, split="train"):
                assert (tuple(sorted(example["numbers"])), example["target"]) not in countdown_test
    sums = set()
    for row in load_rows("arithmetic")["test"]:
        terms = row["expression"].replace(" ", "").split("+")
        if len(terms) == 2 and all(t.isdigit() for t in terms):
            sums.add(frozenset(terms) if terms[0] != terms[1] else frozenset(terms[:1]))
    assert sums, "the arithmetic set has plain sums, so this check bites"
    for digits in (1, 2, 3):
        for example in addition_examples(3000, seed=0, digits=digits, split="train"):
            assert frozenset(example["prompt"].removesuffix("=").split("+")) not in sums


@pytest.mark.parametrize("task", TASKS)
def test_reference_replies_score_as_correct_and_well_formatted(task):
    """The reply a few-shot example shows (`doc_to_target`) passes the task's own scoring, for every shipped row."""
    from hf_deepseek.evals.tasks.utils import doc_to_target

    for split in load_rows(task).values():
        for row in split:
            assert scoring.score_greedy(task, row, doc_to_target(row)) == {"pass@1": 1.0, "format": 1.0}, row


@pytest.mark.parametrize("task", TASKS)
def test_test_problems_never_appear_in_reasoning_gym_training_problems(task):
    """The trainers' reasoning-gym problems (`hf_deepseek.data.task_examples`) name problems with the same keys as
    the evaluation sets, so their train-side filter excludes every held-out problem; drawn problems confirm it, at
    a small seed and at the evaluation set's own seed (the same reasoning-gym stream: only the hash separates
    them). gsm_symbolic is not drawn: reasoning-gym spends ~17 s building that generator at the size it uses."""
    reasoning_tasks = pytest.importorskip("hf_deepseek.data.reasoning_tasks")
    rows = load_rows(task)["test"]
    assert all(reasoning_tasks.problem_keys(task, row) == SOURCES[task].keys(row) for row in rows)
    if task == "gsm_symbolic":
        return
    held_out = {SOURCES[task].keys(row)[0] for row in rows}
    for seed in (0, EVAL_SEED):
        for example in reasoning_tasks.task_examples(task, 300, seed=seed, split="train"):
            assert SOURCES[task].keys(example)[0] not in held_out, example


def test_tasks_are_registered_with_lm_eval():
    manager = task_manager()
    names = [f"hfds_{t}" for t in TASKS]
    expected = {*names, *(f"{t}_sampled" for t in names), "hf_deepseek_reasoning", "hf_deepseek_reasoning_sampled"}
    assert expected <= set(manager.all_tasks)
    # no name shadows one of lm-eval's own tasks (its `arithmetic` group, for one)
    from lm_eval.tasks import TaskManager

    assert not set(TaskManager().all_tasks) & (expected - {"hf_deepseek_reasoning", "hf_deepseek_reasoning_sampled"})


def test_evaluate_metric_loads_offline_from_the_package():
    from hf_deepseek.evals.metrics import load_metric

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    metric = load_metric("pass_at_k")
    docs = [{"question": "q", "answer": "12"}, {"question": "q", "answer": "5"}]
    samples = [["<think>x</think><answer>12</answer>", "12", "13"], ["6", "<answer>6</answer>", "5"]]
    result = metric.compute(predictions=samples, references=[json.dumps(d) for d in docs], task="arithmetic", k=[1, 2])
    expected = [score_samples("arithmetic", d, s, [1, 2]) for d, s in zip(docs, samples, strict=True)]
    assert result == pytest.approx({name: (expected[0][name] + expected[1][name]) / 2 for name in expected[0]})
    assert result["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2) and result["maj@3"] == 0.5


# ---------------------------------------------------------------------------------------------------- lm-eval


class OracleLM(LM):
    """Answers each prompt with scripted completions: `script[question][j]` for the j-th request of that prompt."""

    def __init__(self, script: dict[str, list[str]]):
        super().__init__()
        self.script = script
        self.calls: dict[str, int] = {}

    def generate_until(self, requests):
        out = []
        for request in requests:
            context = request.args[0]
            question = next(q for q in self.script if context.startswith(q))
            j = self.calls.get(question, 0)
            self.calls[question] = j + 1
            out.append(self.script[question][j])
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def tagged(answer: str) -> str:
    return f"<think>working</think><answer>{answer}</answer>"


def test_oracle_model_gets_exactly_the_expected_metrics():
    """Scripted samples with known correctness, votes and format; lm-eval's aggregates must match a hand count."""
    arithmetic = load_rows("arithmetic")["test"][:4]
    countdown = load_rows("countdown")["test"][:3]
    script, expected_correct, expected_format, expected_maj = {}, {}, {}, {}

    def add(task, doc, completions, correct, maj):
        script[doc["question"]] = completions
        expected_correct.setdefault(task, []).append(correct)
        # by construction, exactly the scripted completions that open with <think> are well formed
        expected_format.setdefault(task, []).append([c.startswith("<think>") for c in completions])
        expected_maj.setdefault(task, []).append(maj)

    def wrong(doc, delta):
        return str(int(doc["answer"]) + delta)

    a = arithmetic
    # 3 right (2 tagged, 1 by fallback), 5 wrong and all different: the right answer wins the vote
    add("arithmetic", a[0], [tagged(a[0]["answer"]), f"it is {a[0]['answer']}", tagged(a[0]["answer"])]
        + [tagged(wrong(a[0], d)) for d in range(1, 6)], [1, 1, 1, 0, 0, 0, 0, 0], 1)  # fmt: skip
    # 2 right, 3 equal wrong answers: the vote is wrong
    add("arithmetic", a[1], [tagged(wrong(a[1], 7))] * 3 + [tagged(a[1]["answer"])] * 2
        + ["no idea", "<answer></answer>", tagged(wrong(a[1], 8))], [0, 0, 0, 1, 1, 0, 0, 0], 0)  # fmt: skip
    # nothing right
    add("arithmetic", a[2], [tagged(wrong(a[2], d)) for d in range(8)][1:] + ["blank"], [0] * 8, 0)
    # a 2-2 tie between a right and a wrong answer: the earlier (right) one wins
    add("arithmetic", a[3], [a[3]["answer"], wrong(a[3], 1), wrong(a[3], 1), tagged(a[3]["answer"])]
        + ["?"] * 4, [1, 0, 0, 1, 0, 0, 0, 0], 1)  # fmt: skip
    c = countdown
    # different right expressions vote together (3 of them) against 2 equal wrong ones
    swapped = [f"{c[0]['answer']}", f"({c[0]['answer']})", f"({c[0]['answer']}) = {c[0]['target']}"]
    bad = " + ".join(map(str, c[0]["numbers"])) + " + 1"  # uses a number that is not given
    add("countdown", c[0], [tagged(bad), tagged(bad)] + [tagged(s) for s in swapped] + ["x"] * 3,
        [0, 0, 1, 1, 1, 0, 0, 0], 1)  # fmt: skip
    add("countdown", c[1], [tagged(c[1]["answer"])] * 8, [1] * 8, 1)
    add("countdown", c[2], ["<think>t</think><answer>1+1</answer>"] * 8, [0] * 8, 0)

    oracle = OracleLM(script)
    tasks = ["hfds_arithmetic_sampled", "hfds_countdown_sampled"]
    limits = {"hfds_arithmetic_sampled": len(a), "hfds_countdown_sampled": len(c)}
    for task in tasks:
        results = lm_eval.simple_evaluate(
            model=oracle, tasks=[task], limit=limits[task], task_manager=task_manager(), log_samples=True
        )
        metrics = results["results"][task]
        name = task.removeprefix("hfds_").removesuffix("_sampled")
        per_doc = expected_correct[name]
        for k in (1, 4, 8):
            want = sum(brute_force_pass_at_k([bool(x) for x in doc], k) for doc in per_doc) / len(per_doc)
            assert metrics[f"pass@{k},samples"] == pytest.approx(want, abs=1e-12), (task, k)
        assert metrics["maj@8,samples"] == pytest.approx(sum(expected_maj[name]) / len(per_doc), abs=1e-12)
        flags = expected_format[name]
        assert metrics["format,samples"] == pytest.approx(sum(sum(f) / 8 for f in flags) / len(flags), abs=1e-12)
        assert all(len(s["filtered_resps"][0]) == 8 for s in results["samples"][task])

    # the greedy task scores the single completion it gets: here the first scripted sample of each problem
    oracle.calls.clear()
    manager = task_manager()
    results = lm_eval.simple_evaluate(model=oracle, tasks=["hfds_arithmetic"], limit=len(a), task_manager=manager)
    metrics = results["results"]["hfds_arithmetic"]
    assert metrics["pass@1,none"] == pytest.approx(sum(doc[0] for doc in expected_correct["arithmetic"]) / len(a))
    assert metrics["format,none"] == pytest.approx(sum(f[0] for f in expected_format["arithmetic"]) / len(a))


class ChatRecordingLM(OracleLM):
    """Records the chat-templated prompts lm-eval sends, rendered by the demo model's own template."""

    def __init__(self, tokenizer):
        super().__init__({})
        self.tokenizer, self.contexts = tokenizer, []

    @property
    def tokenizer_name(self) -> str:
        return "hf-deepseek-r1-tiny"

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def generate_until(self, requests):
        self.contexts += [request.args[0] for request in requests]
        return ["<think>x</think><answer>0</answer>"] * len(requests)


def test_second_turn_task_sends_the_conversation_the_chat_app_sends():
    """hfds_addition_turn2's prompt is the chat app's for the same two turns: an earlier sum and its reply as the
    app sends it back (`<answer>...</answer>`), then the held-out sum, each user turn with the R1 instruction."""
    from transformers import AutoTokenizer

    from hf_deepseek.data.r1 import user_content

    checkpoint = Path(__file__).resolve().parents[1] / "checkpoints" / "hf-deepseek-r1-tiny"
    lm = ChatRecordingLM(AutoTokenizer.from_pretrained(checkpoint))
    lm_eval.simple_evaluate(
        model=lm, tasks=["hfds_addition_turn2"], limit=4, apply_chat_template=True, task_manager=task_manager()
    )
    rows = load_rows("addition")

    def conversation(earlier: dict, question: dict) -> str:
        return lm.apply_chat_template([
            {"role": "user", "content": user_content(earlier["question"])},
            {"role": "assistant", "content": f"<answer>{earlier['answer']}</answer>"},
            {"role": "user", "content": user_content(question["question"])},
        ])  # fmt: skip

    app = {conversation(e, d): d["question"] for e in rows["fewshot"] for d in rows["test"][:4]}
    assert all(context in app for context in lm.contexts), lm.contexts[0]
    assert sorted(app[c] for c in lm.contexts) == sorted(d["question"] for d in rows["test"][:4])


def test_hflm_batched_left_padded_generation_equals_batch_size_one(tokenizer):
    """Inside lm-eval (HFLM on an in-memory model, simple_evaluate), batches of prompts of different lengths are
    left-padded; every completion must equal the one generated alone."""
    model = char_model(tokenizer, seed=1, dtype=torch.float64)
    runs = {}
    for batch_size in (1, 4):
        results = evaluate_model(
            model, tokenizer, tasks=["hfds_countdown", "hfds_arithmetic"], batch_size=batch_size, limit=8,
            gen_kwargs={"max_gen_toks": 24}, log_samples=True,
        )  # fmt: skip
        runs[batch_size] = {
            task: {s["doc_id"]: (s["arguments"][0][0], s["resps"][0][0]) for s in samples}
            for task, samples in results["samples"].items()
        }
    assert runs[1] == runs[4]
    for task in ("hfds_countdown", "hfds_arithmetic"):
        prompts = [prompt for prompt, _ in runs[4][task].values()]
        completions = [completion for _, completion in runs[4][task].values()]
        assert len({len(p) for p in prompts}) > 1, "prompts of different lengths, so the batches are padded"
        assert len(set(completions)) > 1 and all(completions), "the model says different, non-empty things"


def test_eval_command_runs_offline_on_a_saved_checkpoint(tokenizer, tmp_path):
    """`hf-deepseek eval` as a user runs it: a fresh process, lm-eval's arguments, a checkpoint saved by the project."""
    checkpoint = tmp_path / "model"
    char_model(tokenizer).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    output = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "hf_deepseek.cli", "eval", "--model_args", f"pretrained={checkpoint}",
        "--tasks", "hfds_countdown,hfds_arithmetic,hfds_gsm_symbolic", "--limit", "20", "--batch_size", "4",
        "--gen_kwargs", "max_gen_toks=8", "--output_path", str(output), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [f"hfds_{task}" for task in TASKS]
    for task in names:
        assert any(line.startswith(f"|{task}") for line in done.stdout.splitlines()), done.stdout
    results = {}  # one results file per task, each written as its task finished
    for results_file in output.rglob("results_*.json"):
        results.update(json.loads(results_file.read_text())["results"])
    assert set(results) == set(names)
    for task in names:
        assert 0.0 <= results[task]["pass@1,none"] <= 1.0 and 0.0 <= results[task]["format,none"] <= 1.0
    samples = list(output.rglob("samples_hfds_countdown_*.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 20
