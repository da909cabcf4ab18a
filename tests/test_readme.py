"""The README is a manual: every Python and shell snippet in it runs, here with fewer steps and problems.

Python blocks (```python) run in this process, each in a fresh namespace, from a scratch directory that links the
repository's `checkpoints/` (a block whose first line is `# torchrun ... --nproc-per-node N FILE.py` runs so, on N
CPU processes); shell blocks (```bash) run `hf-deepseek ...` through `python -m hf_deepseek.cli`.
Blocks marked ```bash skip-test (installs, `make` targets, GPU runs) are not run.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# smaller settings for the test: same code path, a fraction of the time
SHRINK = [
    (r"\bmax_steps=\d+", "max_steps=2"),
    (r"\blimit=\d+", "limit=4"),
    (r"--limit \d+", "--limit 4"),
    (r"\bmax_completion_length=\d+", "max_completion_length=16"),
    (r"\bmax_new_tokens=\d+", "max_new_tokens=40"),
]


def readme_blocks(language: str) -> list[str]:
    blocks = FENCE.findall((REPO / "README.md").read_text())
    return [body for lang, info, body in blocks if lang == language and "skip-test" not in info]


def shrink(code: str) -> str:
    for pattern, replacement in SHRINK:
        code = re.sub(pattern, replacement, code)
    return code


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").symlink_to(REPO / "checkpoints")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def official_checkpoint(path: Path) -> None:
    """A tiny checkpoint as transformers' DeepseekV3 writes it (DeepSeek's tensor layout, `model_type: deepseek_v3`)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=256, first_k_dense_replace=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).save_pretrained(path)


PYTHON_BLOCKS = readme_blocks("python")
BASH_BLOCKS = readme_blocks("bash")


def test_the_readme_has_a_snippet_for_each_job():
    code = "\n".join(PYTHON_BLOCKS + BASH_BLOCKS)
    for job in (
        "generate(",
        "build_chat_app",
        "DeepSeekSFTTrainer",
        "LoraConfig",
        "DeepSeekGRPOTrainer",
        "hf-deepseek eval",
        "lm_eval.simple_evaluate",
        'from_pretrained("DeepSeek-V3',
        "hf-deepseek bench",
    ):
        assert job in code, job  # fmt: skip
    readme = (REPO / "README.md").read_text()
    assert readme.index("make demo") < readme.index("make test") < readme.index("```python")
    assert "trl.SFTTrainer" in readme  # says that TRL's plain trainer skips the MTP loss


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_runs(index, scratch, capsys):
    code = shrink(PYTHON_BLOCKS[index])
    launch = re.match(r"# (torchrun .*--nproc-per-node (\d+)) (\S+\.py)\n", code)
    if launch:  # a multi-process snippet: run as its first line says, on CPU processes (gloo)
        (scratch / launch[3]).write_text(code)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONUNBUFFERED", None)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", launch[2]]
        result = subprocess.run([*command, launch[3]], cwd=scratch, env=env, capture_output=True, text=True,
                                timeout=280)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        # each rank prints its generated token lists ([[...]]); the ranks share one pipe and their writes may
        # interleave within a line, so count the lists, not the lines
        assert "print(" not in code or result.stdout.count("[[") == int(launch[2]), result.stdout
        return
    if "DeepSeek-V3-official" in code:
        official_checkpoint(scratch / "DeepSeek-V3-official")
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    if "print(" in code:
        assert capsys.readouterr().out.strip(), "the snippet prints nothing"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(BASH_BLOCKS)))
def test_shell_snippet_runs(index, scratch):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for line in shrink(BASH_BLOCKS[index]).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "hf-deepseek", line
        result = subprocess.run(
            [sys.executable, "-m", "hf_deepseek.cli", *words[1:]], cwd=scratch, env=env, capture_output=True,
            text=True, timeout=280,
        )  # fmt: skip
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
