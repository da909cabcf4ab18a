"""The `hf-deepseek` command as a newcomer meets it: every misuse ends in one line naming the fix and exit status 2
(no traceback), `--help` imports none of the heavy libraries, `bench` picks the device that exists, and `eval`
never loses work (generation capped to the context, each task's results kept, a failing task reported)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.cli import main, resolve_device, shipped_recipes
from hf_deepseek.data import build_tokenizer
from hf_deepseek.usage_errors import UsageError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "lm_eval", "gradio")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny random model with the project's tokenizer (and chat template) and a 448-token context."""
    tokenizer = build_tokenizer()
    config = tiny_config(
        vocab_size=len(tokenizer),
        max_position_embeddings=448,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    DeepSeekForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


MISUSES = {
    "missing model directory (chat)": (["chat", "--model", "no/such/dir"], "--model"),
    "missing model directory (bench)": (["bench", "--checkpoint", "no/such/dir", "--device", "cpu"], "--checkpoint"),
    "missing model directory (demo)": (["demo", "--checkpoint", "no/such/dir"], "--checkpoint"),
    "missing model directory (eval)": (
        ["eval", "--model_args", "pretrained=no/such/dir", "--tasks", "x"],
        "pretrained",
    ),
    "missing model directory (train)": (["train", "grpo", "--recipe", "r1_tiny", "grpo.init=no/such/dir"], "init"),
    "dashed recipe override": (["train", "sft", "--recipe", "r1_tiny", "--max_steps=2"], "e.g. max_steps=2"),
    "dashed, misspelt override": (["train", "sft", "--recipe", "r1_tiny", "--max_step=2"], "did you mean 'max_steps'"),
    "misspelt recipe field": (["train", "sft", "--recipe", "r1_tiny", "max_step=2"], "did you mean 'max_steps'"),
    "misspelt config key": (
        ["train", "sft", "--recipe", "r1_tiny", "model.config.hidden_sise=64"],
        "did you mean 'hidden_size'",
    ),
    "misspelt config key (demo)": (["demo", "--set", "model.config.hidden_sise=64"], "did you mean 'hidden_size'"),
    "unknown recipe": (["train", "sft", "--recipe", "no_such_recipe"], "r1_tiny"),
    "unknown stage": (["train", "warmup", "--recipe", "r1_tiny"], "use one of"),
    "bad override value": (["train", "sft", "--recipe", "r1_tiny", "max_steps=many"], "an integer"),
    "bad list value": (["bench", "--batch-sizes", "1,x", "--device", "cpu"], "1,8,32"),
    "bad count": (["chat", "--model", "checkpoints/hf-deepseek-r1-add-sub", "--concurrency", "0"], "at least 1"),
    "misspelt option": (["bench", "--devise=cpu"], "--devise"),
    "unknown device": (["bench", "--device", "tpu", "--tiny"], "cpu, cuda or cuda:N"),
}


@pytest.mark.parametrize("argv, fix", MISUSES.values(), ids=MISUSES.keys())
def test_misuse_exits_2_with_one_line_naming_the_fix(capsys, monkeypatch, argv, fix):
    monkeypatch.chdir(REPO)
    code, out, err = run_main(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-deepseek") and "error:" in lines[0]
    assert fix in lines[0]
    assert "Traceback" not in err + out


def test_cuda_asked_for_without_cuda_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(capsys, ["bench", "--device", "cuda", "--tiny"])
    assert code == 2 and "--device cpu" in err and len(err.strip().splitlines()) == 1


def test_bench_chooses_the_device_that_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"
    with pytest.raises(UsageError):
        resolve_device("gpu")


def test_train_help_lists_the_shipped_recipes(capsys):
    code, out, _ = run_main(capsys, ["train", "--help"])
    assert code == 0
    recipes = shipped_recipes()
    assert {"r1", "r1_zero", "distill"} <= set(recipes)
    assert all(name in out for name in recipes)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["chat", "--help"], ["bench", "decode", "--help"]])
def test_help_imports_no_heavy_library(argv):
    """`--help` must not import torch, transformers, TRL, lm-eval or Gradio (they take seconds to import)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hf_deepseek.cli", *argv],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), imported & set(HEAVY)
    assert "usage: hf-deepseek" in result.stdout


def test_misuse_in_a_real_process_has_no_traceback(tmp_path):
    for argv in (["chat", "--model", str(tmp_path / "nope")], ["train", "sft", "--recipe", "r1_tiny", "--max_step=2"]):
        result = subprocess.run(
            [sys.executable, "-m", "hf_deepseek.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_eval_list_shows_each_task_with_its_description(capsys):
    from hf_deepseek.evals.harness import project_tasks

    main(["eval", "--list"])
    out = capsys.readouterr().out
    tasks = project_tasks()
    assert len(tasks) >= 4 and all(description for description in tasks.values())
    for name, description in tasks.items():
        assert any(name in line and description in line for line in out.splitlines())


BROKEN_TASK = """task: broken_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {missing}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
"""


def test_eval_caps_generation_to_the_context_and_keeps_every_other_tasks_results(capsys, saved_model, tmp_path):
    """gsm_symbolic asks for 512 generated tokens of a 448-token model: it runs capped, with a warning naming it;
    a task that fails is reported while the others complete and keep their results."""
    from hf_deepseek.evals.harness import project_tasks

    greedy = [name for name in project_tasks() if not name.endswith("_sampled")]
    long_task = next(name for name in greedy if "gsm_symbolic" in name)
    short_task = next(name for name in greedy if "addition" in name)
    broken = tmp_path / "tasks"
    broken.mkdir()
    (broken / "broken_task.yaml").write_text(BROKEN_TASK.format(missing=tmp_path / "missing.jsonl"))
    out_dir = tmp_path / "results"
    code, out, err = run_main(
        capsys,
        ["eval", "--model_args", f"pretrained={saved_model}", "--tasks", f"{short_task},broken_task,{long_task}",
         "--include_path", str(broken), "--limit", "2", "--batch_size", "2", "--output_path", str(out_dir)],
    )  # fmt: skip
    assert code == 1  # one task failed
    assert f"task {long_task} asks for 512 generated tokens" in err and "capped" in err
    assert "task broken_task failed" in err
    assert "chat template" in err  # applied automatically: the checkpoint has one
    files = sorted(out_dir.rglob("results_*.json"))
    scored = {task for path in files for task in json.loads(path.read_text())["results"]}
    assert scored == {short_task, long_task}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_chat_with_a_missing_model_gives_the_right_advice():
    result = subprocess.run(
        ["make", "-s", "chat", "CHAT_MODEL=no/such/model"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    ours = [line for line in result.stderr.splitlines() if line.startswith("make chat:")]
    assert len(ours) == 1 and "no/such/model" in ours[0], result.stderr
    assert "make chat CHAT_MODEL=DIR" in ours[0] and "outputs/demo/grpo" in ours[0]
    assert "Traceback" not in result.stderr
