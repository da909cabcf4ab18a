"""The chat's embedded default, checkpoints/hf-deepseek-r1-add-sub: it loads through the Auto classes, its model card
states what the committed evaluation measured, that evaluation puts GRPO above its SFT ancestor in the hardest
bucket, the chat app answers its example questions correctly alone and as a later turn, and re-measured on the CPU it
clears the 95% bar on the hardest bucket and on second turns.
HF_DEEPSEEK_ADD_SUB_CHECKPOINT points the tests at another model (`benchmarks/r1_add_sub_gpu.sh` checks each
candidate with the chat app's conversations and the hardest bucket before it is shipped)."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.app.chat import EXAMPLE_PROMPTS, ChatResponder
from hf_deepseek.data.column_arithmetic import BUCKETS
from hf_deepseek.evals.greedy import greedy_correct
from hf_deepseek.evals.task_data import load_rows

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(os.environ.get("HF_DEEPSEEK_ADD_SUB_CHECKPOINT", REPO / "checkpoints" / "hf-deepseek-r1-add-sub"))
EVALUATION = REPO / "docs" / "r1-add-sub-h200" / "grpo_stage3_eval_2026-12-05.json"
ANCESTOR_EVALUATION = REPO / "docs" / "r1-add-sub-h200" / "anc_eval_large_2026-12-04f.json"  # GRPO's starting point
CARD_ROW = re.compile(r"^\| (\w[\w ]*?) \| (\d+)/(\d+) = ([\d.]+)% \[([\d.]+)%, ([\d.]+)%\] \|$", re.M)
CARD_NAMES = {"first turn": "turn1", "second turn": "turn2"}
OPERATION = re.compile(r"(\d+) ?([+-]) ?(\d+)")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(str(CHECKPOINT)).eval(), AutoTokenizer.from_pretrained(str(CHECKPOINT))


def test_checkpoint_loads_and_fits_the_size_budget(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert type(model).__name__ == "DeepSeekForCausalLM"
    assert model.config.num_nextn_predict_layers == 1 and model.config.n_routed_experts > 1
    assert 0 < sum(p.stat().st_size for p in CHECKPOINT.glob("*.safetensors")) <= 25 * 2**20
    assert (CHECKPOINT / "training_curves.png").is_file()


def test_model_card_states_the_committed_evaluation():
    stated = {CARD_NAMES.get(m[0], m[0]): m[1:] for m in CARD_ROW.findall((CHECKPOINT / "README.md").read_text())}
    measured = next(iter(json.loads(EVALUATION.read_text()).values()))
    assert set(stated) == {*BUCKETS, "turn1", "turn2"}
    for name, (correct, n, _, low, high) in stated.items():
        got = measured[name]
        assert (int(correct), int(n)) == (got["correct"], got["n"]), name
        assert [float(low), float(high)] == [round(100 * x, 1) for x in got["interval"]], name


def test_grpo_clears_its_sft_ancestor_in_the_hardest_bucket():
    """The committed evaluations of the shipped model and of the cold-start checkpoint its GRPO started from: every
    bucket at 95% or more, second turns within 2 points of first ones, and in the ancestor's weakest 2,000-problem
    set the two 95% intervals apart."""
    model = next(iter(json.loads(EVALUATION.read_text()).values()))
    ancestor = next(iter(json.loads(ANCESTOR_EVALUATION.read_text()).values()))
    assert all(model[b]["pass@1"] >= 0.95 for b in BUCKETS)
    assert model["turn1"]["pass@1"] - model["turn2"]["pass@1"] <= 0.02
    hardest = min(("add4_2k", "sub4_2k"), key=lambda name: ancestor[name]["pass@1"])
    assert model[hardest]["interval"][0] > ancestor[hardest]["interval"][1], hardest


def chat_reply(responder: ChatResponder, question: str, history: list[dict]) -> list[dict]:
    """The chat's reply to `question` after `history` (greedy), as the items Gradio adds to the history."""
    *_, (messages, _) = responder.respond(question, history, temperature=0.0, max_new_tokens=512)
    return [{"role": m.role, "content": m.content, "metadata": m.metadata} for m in messages]


def true_result(question: str) -> str:
    a, sign, b = OPERATION.search(question).groups()
    return str(int(a) + int(b) if sign == "+" else int(a) - int(b))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "questions",
    [["What is 2 + 2?"], ["Calculate 4021 - 7386."], ["What is 2 + 2?", "Calculate 4021 - 7386."],
     ["Calculate 9005 - 1997.", "2+2"], EXAMPLE_PROMPTS[:3], EXAMPLE_PROMPTS[1:]],
    ids=["2+2", "4-digit subtraction", "two turns", "two turns, the other way", "examples 1-3", "examples 2-4"],
)  # fmt: skip
def test_chat_app_answers_each_question_of_a_conversation(model_and_tokenizer, questions):
    """Through the app's own responder, each question asked in turn gets its true result; the history holds each
    earlier reply as the app shows it (its reasoning block included, which the app leaves out of the prompt). Up to
    two earlier exchanges, as in training; the app's examples each come after the one before them."""
    responder = ChatResponder(*model_and_tokenizer)
    history: list[dict] = []
    for question in questions:
        reply = chat_reply(responder, question, history)
        answer = "".join(m["content"] for m in reply if not (m["metadata"] or {}).get("title"))
        assert answer == true_result(question), (question, history)
        history += [{"role": "user", "content": question}, *reply]


@pytest.mark.timeout(240)
def test_hardest_bucket_and_second_turns_clear_95_percent_on_the_cpu(model_and_tokenizer):
    """The first 100 held-out 4-digit subtractions, and 100 problems asked as the second turn of a conversation
    (the app's history format), greedy as the chat answers them."""
    model, tokenizer = model_and_tokenizer
    splits = load_rows("add_sub")
    sub4 = [r for r in splits["test"] if r["bucket"] == "sub4"][:100]
    assert sum(greedy_correct(model, tokenizer, sub4, "add_sub", 100, 384)) >= 95
    turns, earlier = splits["turns"][:100], splits["context"][:100]
    assert sum(greedy_correct(model, tokenizer, turns, "add_sub", 100, 384, earlier)) >= 95
