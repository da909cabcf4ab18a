"""hf_deepseek.evals.bench: `hf-deepseek bench --device cpu --tiny` end to end (also without the eval extras, as
in the GPU image), the cache-size figures, and the MTP speculative-decoding measurement (high acceptance on a
learned pattern, low once the MTP head is scrambled)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.cli import main
from hf_deepseek.data import build_tokenizer
from hf_deepseek.evals.bench import (
    OURS,
    PEER,
    TINY_CONFIG,
    TINY_PLAN,
    full_mha_bytes_per_token_per_layer,
    latent_bytes_per_token_per_layer,
    mtp_speculation,
)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# what the GPU image lacks: the bench must run without any of it
EVAL_ONLY_PACKAGES = ["lm_eval", "evaluate", "datasets", "reasoning_gym", "math_verify", "matplotlib"]


def check_results(results: dict, plan_cells: int) -> None:
    assert [m["name"] for m in results["models"]] == [OURS, PEER]
    kv = results["kv_cache_bytes_per_token_per_layer"]
    cfg = results["config"]
    # fp32: the latent (kv_lora_rank) and the roped key, against per-head keys and values
    assert kv["mla_latent"] == (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    heads, head_dims = cfg["num_attention_heads"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"]
    assert kv["full_mha_equivalent"] == heads * head_dims * 4
    assert kv["deepseek_v3_671b_full_mha"] / kv["deepseek_v3_671b_latent"] == pytest.approx(40960 / 576)
    ours, peer = results["models"]
    assert ours["cache_bytes_per_token_per_layer"] == kv["mla_latent"]
    assert peer["cache_bytes_per_token_per_layer"] > 0
    assert ours["mtp_drafts"] > 0 and 0.0 <= ours["mtp_acceptance"] <= 1.0
    assert 1.0 <= ours["mtp_tokens_per_pass"] <= 2.0
    assert ours["speculative_tok_s"] > 0 and ours["greedy_tok_s"] > 0
    assert peer["mtp_acceptance"] is None and peer["speculative_tok_s"] is None
    for model in results["models"]:
        assert len(model["cells"]) == plan_cells
        for cell in model["cells"]:
            if cell["note"].startswith("skipped"):
                assert cell["batch"] * cell["context"] > results["plan"]["max_tokens"] and cell["decode_tok_s"] is None
                continue
            assert cell["prefill_tok_s"] > 0 and cell["decode_tok_s"] > 0, cell
            # the cache holds context + warm-up + timed decode tokens
            tokens = cell["batch"] * (cell["context"] + TINY_PLAN.warmup_steps + TINY_PLAN.decode_steps)
            layers = cfg["num_hidden_layers"]
            assert cell["cache_bytes"] == model["cache_bytes_per_token_per_layer"] * tokens * layers


def test_tiny_bench_without_eval_extras_as_in_the_gpu_image(tmp_path):
    """A fresh process where lm-eval, evaluate, datasets, reasoning-gym, math-verify and matplotlib cannot be
    imported: the bench still measures both models and writes the table and JSON (no charts)."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in EVAL_ONLY_PACKAGES)
    script = (
        f"import sys; {blocked}; from hf_deepseek.cli import main; "
        f"main(['bench', '--device', 'cpu', '--tiny', '--output-dir', {str(tmp_path)!r}])"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| batch | context | model |" in done.stdout and "matplotlib is not installed" in done.stdout
    assert "ratios between the models mean nothing" in done.stdout  # on a CPU, said in the output and in bench.md
    assert "ratios between the models mean nothing" in (tmp_path / "bench.md").read_text()
    results = json.loads((tmp_path / "bench.json").read_text())
    check_results(results, len(TINY_PLAN.batch_sizes) * len(TINY_PLAN.contexts))
    assert results["command"] == f"hf-deepseek bench --device cpu --tiny --output-dir {tmp_path}"
    assert results["checkpoint"] == "random weights"
    assert (tmp_path / "bench.md").read_text().startswith(f"Command: `{results['command']}`")
    assert not list(tmp_path.glob("*.png"))


def test_bench_on_a_saved_checkpoint_with_charts(tmp_path, capsys):
    """`--checkpoint`: both models load the project's saved model; acceptance prompts come from its tokenizer."""
    tokenizer = build_tokenizer()
    model = DeepSeekForCausalLM(tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench"
    main(["bench", "--device", "cpu", "--tiny", "--checkpoint", str(tmp_path / "model"), "--contexts", "8,24",
          "--batch-sizes", "1,3", "--max-tokens", "60", "--output-dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| KV cache, bytes per token per layer | value |" in printed
    results = json.loads((out / "bench.json").read_text())
    check_results(results, 4)
    assert results["checkpoint"] == str(tmp_path / "model")
    assert results["models"][0]["mtp_note"].endswith("held-out Countdown questions")
    cells = {(c["batch"], c["context"]): c["note"] for c in results["models"][1]["cells"]}
    assert cells == {(1, 8): "", (1, 24): "", (3, 8): "", (3, 24): "skipped: batch x context > 60"}
    for name in ("decode.png", "prefill.png", "kv_cache.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_cache_figures_for_deepseek_v3():
    from hf_deepseek import DeepSeekConfig

    v3 = DeepSeekConfig()
    assert latent_bytes_per_token_per_layer(v3, 1) == 576
    assert full_mha_bytes_per_token_per_layer(v3, 1) == 40960


def cyclic_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences x, x+3, x+6, ... (mod vocab): every next token, and the one after, is determined."""
    starts = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (starts + 3 * torch.arange(length)) % vocab


def test_mtp_acceptance_is_high_on_a_learned_pattern_and_falls_with_a_scrambled_mtp_head():
    config = tiny_config(num_hidden_layers=TINY_CONFIG["num_hidden_layers"], vocab_size=32, eos_token_id=None)
    model = DeepSeekForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        ids = cyclic_batch(32, 16, 32, gen)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    prompts = [cyclic_batch(1, 6, 32, gen) for _ in range(4)]
    learned = mtp_speculation(model, prompts, 12, None, torch.device("cpu"))
    assert learned["mtp_acceptance"] >= 0.9 and learned["mtp_tokens_per_pass"] > 1.7, (
        learned
    )  # 12 tokens in 1 + 6 passes

    with torch.no_grad():  # same main model (same greedy tokens), MTP input projection replaced by noise
        model.model.mtp_layers[0].eh_proj.weight.normal_(0.0, 1.0, generator=gen)
    scrambled = mtp_speculation(model, prompts, 12, None, torch.device("cpu"))
    assert scrambled["mtp_acceptance"] <= 0.5 and scrambled["mtp_tokens_per_pass"] < 1.5, scrambled
