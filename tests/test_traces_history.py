"""Traces with conversations (R1's rejection sampling, `r1_add_sub`'s `sft_rejection` stage): the teacher is
sampled on the whole conversation (earlier exchanges as the chat app sends them back, then the question), only
well-formatted, correct replies are kept with their history, and the SFT rows are that conversation with the kept
reply as the completion; without `multi_turn` the traces and rows are as before. The teacher is a tiny random model
whose `generate` is replaced by a script of known replies (right, wrong, malformed), so which replies are kept is
known; everything else (chat template, left padding, decoding, checks, training) is the real code."""

import json
import math

import pytest
import torch
from trainer_helpers import tiny_model

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.cli import main as cli_main
from hf_deepseek.data import build_tokenizer
from hf_deepseek.data.r1 import INSTRUCTION, cold_start_completion
from hf_deepseek.evals.greedy import conversation
from hf_deepseek.trainers.distill import load_traces
from hf_deepseek.trainers.recipes import (
    _problems,
    _resolve_args,
    apply_overrides,
    build_dataset,
    check_recipe,
    load_recipe,
    recipe_stages,
    stage_trainer,
    with_history,
)

STAGE = "sft_rejection"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def wrong(problem) -> str:
    return cold_start_completion({**problem, "answer": str(int(problem["answer"]) + 1)})


def script(problem) -> list[str]:
    """The teacher's 4 samples: for an even answer one wrong, one malformed, then two correct (the first is kept);
    for an odd answer none is both well formatted and correct."""
    right = cold_start_completion(problem)
    if int(problem["answer"]) % 2 == 0:
        return [
            wrong(problem),
            f"The answer is {problem['answer']}.",
            right,
            right.replace("<think>", "<think>Again. "),
        ]
    return [wrong(problem), problem["answer"], f"<answer>{problem['answer']}</answer>", right.replace("</think>", "")]


@pytest.fixture
def teacher(tmp_path, tok, monkeypatch):
    """A tiny model saved as the recipe's GRPO output (the stage's `init` and `teacher`), whose `generate` returns
    the scripted replies after each prompt; returns the list of prompts it was given (decoded, unpadded)."""
    model = tiny_model(tok, max_position_embeddings=512)  # a worked 4-digit difference is ~310 tokens
    model.save_pretrained(tmp_path / "grpo")
    tok.save_pretrained(tmp_path / "grpo")
    prompts, by_question = [], {}

    def generate(self, input_ids, attention_mask=None, **kwargs):
        replies = []
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            assert not mask[: int((1 - mask).sum())].any()  # left padding only
            text = tok.decode(ids[mask.bool()])
            question = text.rsplit("<|user|>", 1)[1].split(f"\n{INSTRUCTION}")[0]
            if i % 4 == 0:  # the stage's 4 samples a problem are consecutive rows
                prompts.append(text)
            reply = script(by_question[question])[i % 4]
            replies.append(tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        width = max(map(len, replies))
        padded = [r + [tok.pad_token_id] * (width - len(r)) for r in replies]
        return torch.cat([input_ids, torch.tensor(padded, dtype=input_ids.dtype)], 1)

    monkeypatch.setattr(DeepSeekForCausalLM, "generate", generate)
    return prompts, by_question


def recipe_for(tmp_path, teacher, *overrides):
    recipe = apply_overrides(
        load_recipe("r1_add_sub"),
        STAGE,
        [f"output_root={tmp_path}", f"{STAGE}.data.tasks={{add_sub: 12}}", f"{STAGE}.data.problems_per_batch=5"]
        + list(overrides),
    )
    _, by_question = teacher
    by_question.update({p["question"]: p for p in _problems(recipe[STAGE]["data"])})
    return recipe


def test_multi_turn_traces_keep_the_conversation_and_only_checked_replies(tmp_path, tok, teacher):
    recipe = recipe_for(tmp_path, teacher)  # 12 problems, 5 a generate() call: left-padded batches
    data = recipe[STAGE]["data"]
    assert data["teacher"] == "grpo" and data["multi_turn"] == 0.5 and data["max_earlier_turns"] == 2
    dataset = build_dataset(recipe, STAGE)

    problems = list(_problems(data))
    paired = with_history(data, problems)
    expected = [(p, h) for p, h in paired if int(p["answer"]) % 2 == 0]
    assert 0 < len(expected) < len(paired)  # some problems have no correct sample: dropped
    assert any(h for _, h in expected) and any(not h for _, h in expected)

    # the teacher saw every conversation through the chat template, earlier exchanges first
    prompts, _ = teacher
    assert prompts == [tok.apply_chat_template(conversation(p, h), add_generation_prompt=True, tokenize=False)
                       for p, h in paired]  # fmt: skip

    traces = load_traces(tmp_path / "rejection_traces.jsonl")
    assert [t["question"] for t in traces] == [p["question"] for p, _ in expected]
    for trace, (problem, history) in zip(traces, expected, strict=True):
        assert trace.get("history", []) == [{"question": e["question"], "answer": e["answer"]} for e in history]
        assert trace["completion"] == cold_start_completion(problem)  # the first accepted sample, not a wrong one

    # prompt-completion rows (as the multi-turn cold start's): the conversation, then the kept reply
    assert dataset.column_names == ["prompt", "completion"] and len(dataset) == len(expected)
    for row, (problem, history) in zip(dataset, expected, strict=True):
        assert row["prompt"] == conversation(problem, history)
        assert row["completion"] == [{"role": "assistant", "content": cold_start_completion(problem)}]
        exchanges = list(zip(row["prompt"][:-1:2], row["prompt"][1::2], strict=True))
        for earlier, (user, reply) in zip(history, exchanges, strict=True):
            assert user["content"].startswith(earlier["question"] + "\n")
            assert reply == {"role": "assistant", "content": f"<answer>{earlier['answer']}</answer>"}


def test_without_multi_turn_traces_and_rows_are_single_questions(tmp_path, tok, teacher):
    recipe = recipe_for(tmp_path, teacher, f"{STAGE}.data.multi_turn=0")
    dataset = build_dataset(recipe, STAGE)
    problems = [p for p in _problems(recipe[STAGE]["data"]) if int(p["answer"]) % 2 == 0]
    prompts, _ = teacher
    assert all(text.count("<|user|>") == 1 for text in prompts) and len(prompts) == 12
    lines = (tmp_path / "rejection_traces.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{**p, "completion": cold_start_completion(p)} for p in problems]
    assert dataset.column_names == ["messages"]
    assert dataset.to_list() == [
        {"messages": [*conversation(p), {"role": "assistant", "content": cold_start_completion(p)}]} for p in problems
    ]


def test_traces_files_mix_histories_and_drop_unchecked_replies(tmp_path):
    problem = {"task": "add_sub", "question": "Calculate 2 + 3.", "answer": "5", "expression": "2+3"}
    earlier = [{"question": "Calculate 1 + 1.", "answer": "2"}]
    rows = [
        {**problem, "completion": cold_start_completion(problem)},  # a trace written before histories existed
        {**problem, "history": earlier, "completion": cold_start_completion(problem)},
        {**problem, "history": earlier, "completion": wrong(problem)},  # wrong: dropped
        {**problem, "history": earlier, "completion": "<answer>5</answer>"},  # no reasoning block: dropped
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"output_root": str(tmp_path), "sft": {"data": {"kind": "traces", "path": "t.jsonl"}}}
    dataset = build_dataset(recipe, "sft")  # a history in the file makes prompt-completion rows without multi_turn
    assert [row["prompt"] for row in dataset] == [conversation(problem), conversation(problem, earlier)]
    assert {row["completion"][0]["content"] for row in dataset} == {cold_start_completion(problem)}


def test_sft_rejection_stage_resolves_and_trains_from_the_grpo_output(tmp_path, tok, teacher, capsys):
    recipe = load_recipe("r1_add_sub")
    assert recipe_stages(recipe) == ["sft", "grpo"]  # `train all` is unchanged
    assert stage_trainer(recipe, STAGE) == "sft" and recipe[STAGE]["init"] == "grpo"
    assert recipe[STAGE]["data"]["bucket_weights"] == recipe["sft"]["data"]["bucket_weights"]
    assert recipe[STAGE]["data"]["samples_per_problem"] == 4
    check_recipe(recipe, [STAGE])
    args = _resolve_args(recipe, STAGE)
    assert args["output_dir"] == "outputs/r1_add_sub/sft_rejection" and args["assistant_only_loss"] is False

    recipe_for(tmp_path, teacher)  # the scripted teacher's problems
    small = ["max_steps=2", "per_device_train_batch_size=2", "dataloader_num_workers=0", "dataset_num_proc=null"]
    small += ["logging_steps=1", "max_length=512", "warmup_steps=1"]
    argv = ["train", STAGE, "--recipe", "r1_add_sub", f"output_root={tmp_path}", f"{STAGE}.data.tasks={{add_sub: 12}}"]
    cli_main([*argv, *small])
    assert "sft_rejection: saved model" in capsys.readouterr().out
    out = tmp_path / STAGE
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("step,") and len(metrics) >= 3
    trained = DeepSeekForCausalLM.from_pretrained(out)
    start = DeepSeekForCausalLM.from_pretrained(tmp_path / "grpo")
    assert trained.config.hidden_size == start.config.hidden_size  # it started from the GRPO output
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters(), strict=True))
    assert all(math.isfinite(p.sum().item()) for p in trained.parameters())


def test_real_generate_samples_left_padded_batches_of_conversations(tmp_path, tok, monkeypatch):
    import hf_deepseek.trainers.distill as distill

    tiny_model(tok).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    earlier = [{"question": "Calculate 10 + 20.", "answer": "30"}, {"question": "What is 7 - 9?", "answer": "-2"}]
    problems = [
        {"task": "add_sub", "question": "Calculate 2 + 3.", "answer": "5"},
        {"task": "add_sub", "question": "Calculate 4 + 4.", "answer": "8", "history": earlier},
        {"task": "add_sub", "question": "Calculate 9 - 1.", "answer": "8", "history": earlier[:1]},
    ]
    path = tmp_path / "traces.jsonl"
    # a random model writes nothing acceptable; accepting everything shows each problem's row and its history
    assert distill.generate_traces(tmp_path / "teacher", problems, path, 2, 3, problems_per_batch=2) == 0
    monkeypatch.setattr(distill, "accepted", lambda row: True)
    assert distill.generate_traces(tmp_path / "teacher", problems, path, 2, 3, problems_per_batch=2) == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "completion"} for r in rows] == problems
    assert all(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) <= 3 for r in rows)


def test_interrupted_sampling_leaves_no_traces_file_to_reuse(tmp_path, tok, teacher, monkeypatch):
    """The stage reuses a traces file that exists, so a run stopped while sampling must not leave a partial one: it
    is written aside and renamed only when complete."""
    recipe = recipe_for(tmp_path, teacher)
    calls = []
    scripted = DeepSeekForCausalLM.generate

    def stopped_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return scripted(self, *args, **kwargs)

    monkeypatch.setattr(DeepSeekForCausalLM, "generate", stopped_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(recipe, STAGE)
    assert not (tmp_path / "rejection_traces.jsonl").exists()
    monkeypatch.setattr(DeepSeekForCausalLM, "generate", scripted)
    assert len(build_dataset(recipe, STAGE)) > 0 and (tmp_path / "rejection_traces.jsonl").is_file()
