"""The demo's R1 checkpoint (hf-deepseek-r1-tiny): it loads through the Auto classes, and its model card's
held-out pass@1 holds.

The card states greedy pass@1 on the 500 held-out sums of lm-eval's `addition` task with a Wilson 95% interval;
this test answers the same 500 sums greedily (batched, left-padded, as lm-eval's HF model does) and checks that the
re-measured pass@1 lies inside the stated interval.
"""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_deepseek  # noqa: F401  (registers the Auto classes)
from hf_deepseek.evals.greedy import greedy_pass_at_1
from hf_deepseek.evals.task_data import load_rows

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "hf-deepseek-r1-tiny"
CARD_ROW = re.compile(r"^\| this model[^|]*\| (\d+)/(\d+) \| [\d.]+% \| \[([\d.]+)%, ([\d.]+)%\] \|", re.M)

pytestmark = pytest.mark.skipif(not (CHECKPOINT / "config.json").is_file(), reason="no embedded checkpoint")


def stated_pass_at_1() -> tuple[int, int, float, float]:
    found = CARD_ROW.search((CHECKPOINT / "README.md").read_text())
    assert found, "the model card has no 'this model' row"
    correct, n, low, high = found.groups()
    return int(correct), int(n), float(low) / 100, float(high) / 100


def test_checkpoint_loads_through_auto_classes():
    model = AutoModelForCausalLM.from_pretrained(str(CHECKPOINT))
    assert type(model).__name__ == "DeepSeekForCausalLM"
    assert model.config.num_nextn_predict_layers == 1 and model.config.n_routed_experts > 1
    size = sum(p.stat().st_size for p in CHECKPOINT.glob("*.safetensors"))
    assert 0 < size <= 20 * 2**20
    assert (CHECKPOINT / "tokenizer.json").is_file() and (CHECKPOINT / "training_curves.png").is_file()


@pytest.mark.timeout(120)
def test_held_out_pass_at_1_is_within_the_stated_interval():
    _, n, low, high = stated_pass_at_1()
    rows = load_rows("addition")["test"][:n]
    assert len(rows) == n
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(CHECKPOINT)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(CHECKPOINT))
    measured = greedy_pass_at_1(model, tokenizer, rows)
    assert low <= measured <= high, f"re-measured pass@1 {measured:.3f} outside the card's [{low:.3f}, {high:.3f}]"
