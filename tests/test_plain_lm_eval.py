"""A saved checkpoint used by path from plain tools, in fresh processes that never import hf_deepseek themselves:
transformers' Auto classes and `pipeline` (`trust_remote_code=True`, through the `hf_deepseek_auto.py` that
`save_pretrained` writes and `auto_map` names), and the real `lm_eval` command line scoring one of the project's
tasks (`--include_path` printed by `python -m hf_deepseek.evals.tasks`) and one of lm-eval's own tasks
(`arithmetic_1dc`, its data provided locally: lm-eval reads it from the Hub otherwise)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.data import build_tokenizer
from hf_deepseek.evals.task_data import TASKS_DIR

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
# the checkout under test is what the shim's `import hf_deepseek` must find in the child processes
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
PROMPT = "Calculate 12 + 34."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model over the character tokenizer, saved with its tokenizer as a user would."""
    tokenizer = build_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config = tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **ids)
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("plain") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return path, tokenizer.decode(expected[0, prompt.shape[1] :], skip_special_tokens=True)


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


PLAIN_TRANSFORMERS = """
import sys
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

path = sys.argv[1]
try:
    AutoConfig.from_pretrained(path)
except ValueError as err:
    assert "trust_remote_code=True" in str(err), err
else:
    raise AssertionError("loading custom code without trust_remote_code should be refused")
assert "hf_deepseek" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
print(type(model).__module__, type(model).__name__)
generator = pipeline("text-generation", model=path, trust_remote_code=True)
out = generator({prompt!r}, max_new_tokens=6, do_sample=False, return_full_text=False)
print("GENERATED:" + repr(out[0]["generated_text"]))
"""


def test_plain_transformers_and_pipeline_load_the_checkpoint_by_path(checkpoint, tmp_path):
    path, expected = checkpoint
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "hf_deepseek_auto.DeepSeekForCausalLM"
    assert (path / "hf_deepseek_auto.py").is_file()
    done = run([sys.executable, "-c", PLAIN_TRANSFORMERS.format(prompt=PROMPT), str(path)], cwd=tmp_path)
    assert "hf_deepseek.modeling.model DeepSeekForCausalLM" in done.stdout
    assert f"GENERATED:{expected!r}" in done.stdout


def arithmetic_rows() -> list[dict]:
    """Rows as EleutherAI/arithmetic's `single_digit_three_ops.jsonl` has them (context, completion)."""
    rows = []
    for a, b, c in [(2, 3, 4), (5, 1, 6), (7, 2, 3), (9, 4, 1), (3, 3, 8), (6, 2, 5)]:
        rows.append({"context": f"Q: What is ({a} + {b}) * {c}?\n\nA:", "completion": f" {(a + b) * c}"})
    return rows


def lm_eval_command() -> list[str]:
    script = Path(sys.executable).parent / "lm_eval"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]


def test_plain_lm_eval_command_scores_a_project_task_and_an_lm_eval_task(checkpoint, tmp_path):
    path, _ = checkpoint
    include = run([sys.executable, "-m", "hf_deepseek.evals.tasks"], cwd=tmp_path).stdout.strip()
    assert Path(include) == TASKS_DIR

    # lm-eval's own arithmetic_1dc (its prompt, processing and metric), reading a local copy of its data file
    data = tmp_path / "single_digit_three_ops.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows()))
    import lm_eval

    own = Path(lm_eval.__file__).parent / "tasks" / "arithmetic" / "arithmetic_1dc.yaml"
    task_yaml = tmp_path / "arithmetic_1dc_local.yaml"
    task_yaml.write_text(f"include: {own}\ndataset_kwargs:\n  data_files:\n    validation: {data}\n")

    output = tmp_path / "results"
    command = lm_eval_command() + [
        "--model", "hf", "--model_args", f"pretrained={path},trust_remote_code=True",
        "--tasks", f"hfds_addition,{task_yaml}", "--include_path", include, "--limit", "4",
        "--gen_kwargs", "max_gen_toks=8", "--batch_size", "2", "--output_path", str(output),
    ]  # fmt: skip
    done = run(command, cwd=tmp_path, timeout=600)
    (results_file,) = output.rglob("results_*.json")
    report = json.loads(results_file.read_text())
    results = report["results"]
    assert set(results) == {"hfds_addition", "arithmetic_1dc"}, done.stdout
    assert 0.0 <= results["hfds_addition"]["pass@1,none"] <= 1.0
    assert 0.0 <= results["hfds_addition"]["format,none"] <= 1.0
    assert 0.0 <= results["arithmetic_1dc"]["acc,none"] <= 1.0
    assert report["n-samples"]["hfds_addition"]["effective"] == report["n-samples"]["arithmetic_1dc"]["effective"] == 4
