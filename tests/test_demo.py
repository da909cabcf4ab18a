"""End-to-end smoke test of `hf-deepseek demo` with a short run: train, save, reload, generate."""

import json

import pytest

from hf_deepseek.cli import build_parser, main


def test_demo_defaults():
    args = build_parser().parse_args(["demo"])
    assert args.steps > 0 and args.batch_size > 0 and args.output_dir == "outputs/demo-model"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_short_demo_saves_a_reloadable_model(tmp_path, capsys):
    output_dir = tmp_path / "demo-model"
    main(["demo", "--steps", "20", "--batch-size", "16", "--output-dir", str(output_dir)])
    printed = capsys.readouterr().out
    assert "Held-out accuracy" in printed and "Next-token loss fell from" in printed
    config = json.loads((output_dir / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert (output_dir / "tokenizer.json").exists()
    assert any(output_dir.glob("*.safetensors"))
