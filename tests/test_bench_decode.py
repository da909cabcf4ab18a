"""hf_deepseek.evals.bench_decode: `hf-deepseek bench decode --device cpu --tiny` end to end, and the read floor."""

import json

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.cli import build_parser, main
from hf_deepseek.evals.bench_decode import PREFILL_ROWS, ROWS, STEP_ROWS, cache_bytes, step_weight_bytes


def test_bench_decode_tiny_smoke(tmp_path):
    cells_profiled = "ours-fast:2:16,ours-generate:2:16"
    main(["bench", "decode", "--device", "cpu", "--tiny", "--output-dir", str(tmp_path), "--profile", cells_profiled])
    results = json.loads((tmp_path / "bench_decode.json").read_text())
    profile = (tmp_path / "profile_ours-fast_b2_c16.txt").read_text()  # the asked cell's steps, operator by operator
    assert profile.startswith("2 decode steps, batch 2, context 19") and "aten::bmm" in profile
    profile = (tmp_path / "profile_ours-generate_b2_c16.txt").read_text()  # one generate() call of the asked cell
    assert profile.startswith("one generate() of 6 new tokens, batch 2, context 16") and "aten::" in profile
    assert results["command"].startswith("hf-deepseek bench decode --device cpu --tiny")
    cells = {cell["row"]: cell for cell in results["cells"]}
    assert set(cells) == set(ROWS)
    for row in set(ROWS) - set(PREFILL_ROWS):
        cell = cells[row]
        assert cell["ms_per_step"] and cell["ms_per_step"] > 0, cell
        assert cell["tokens_per_s"] == cell["batch"] * 1000 / cell["ms_per_step"]
        assert cell["speedup_vs_transformers_eager"] > 0
    assert cells["ours-mtp"]["acceptance_rate"] is not None and cells["ours-mtp"]["tokens_per_step"] >= 1
    # the MTP device loop against plain greedy generate() in the same run, the same tokens
    assert cells["ours-mtp"]["speedup_vs_plain"] > 0 and "equal to plain greedy: True" in cells["ours-mtp"]["note"]
    assert cells["ours-fast"]["floor_fraction"] > 0
    # the host's time a step beside the step's: on the CPU the host's clock is the step's (the note is for CUDA)
    fast = cells["ours-fast"]
    assert abs(fast["host_ms_per_step"] - fast["ms_per_step"]) < 0.05 * fast["ms_per_step"], fast
    assert "host-bound" not in fast["note"]
    # generate() end to end, both models, prefill subtracted: a per-token time and the prefill in the note
    for row in ("ours-generate", "transformers-generate"):
        cell = cells[row]
        assert cell["note"] == f"prefill {cell['prefill_ms']:.1f} ms", cell
        assert cell["prefill_tokens_per_s"] == cell["batch"] * cell["context"] * 1000 / cell["prefill_ms"]
    # generate() rows against transformers' generate(), per new token and in prefill
    ours, theirs = cells["ours-generate"], cells["transformers-generate"]
    assert ours["speedup_vs_transformers_best"] == theirs["ms_per_step"] / ours["ms_per_step"]
    ours_generate_prefill = ours["prefill_ms"]  # its prefill against transformers' prefill row's (below)
    assert cells["ours-fast"].get("prefill_speedup_vs_transformers") is None
    # the prompts into the cache alone, both models: prompt tokens a second, against transformers' prefill row's
    for row in PREFILL_ROWS:
        cell = cells[row]
        assert cell["ms_per_step"] is None and cell["note"] == f"prefill {cell['prefill_ms']:.1f} ms", cell
        assert cell["prefill_tokens_per_s"] == cell["batch"] * cell["context"] * 1000 / cell["prefill_ms"]
    ours, theirs = cells["ours-prefill"], cells["transformers-prefill"]
    assert ours["prefill_speedup_vs_transformers"] == theirs["prefill_ms"] / ours["prefill_ms"]
    assert cells["ours-generate"]["prefill_speedup_vs_transformers"] == theirs["prefill_ms"] / ours_generate_prefill
    # one floor per (batch, context): the same bytes to read whichever decode row (transformers' too) reads them
    steps = [c for c in results["cells"] if c["row"] != "ours-mtp" and c["row"] not in PREFILL_ROWS]
    floors = {(c["batch"], c["context"], c["floor_ms"]) for c in steps}
    assert len(floors) == len({(c["batch"], c["context"]) for c in steps})
    table = (tmp_path / "bench_decode.md").read_text()
    assert all(f"| {row} |" in table for row in ROWS)
    run = str(tmp_path / "bench_decode.json")
    main(["bench", "decode", "--merge", f"{run},{run}", "--output-dir", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "bench_decode.json").read_text())
    assert len(merged["cells"]) == 2 * len(results["cells"]) and merged["command"].count(" ; ") == 1


def test_every_step_row_can_be_asked_for_and_is_listed_in_the_help():
    """`--rows` accepts the names in ROWS: each step row of STEP_ROWS is one, and `--help` names every row."""
    assert set(STEP_ROWS) <= set(ROWS)
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    decode = bench._subparsers._group_actions[0].choices["decode"]
    rows_help = next(a.help for a in decode._actions if "--rows" in a.option_strings)
    assert [row for row in ROWS if row not in rows_help] == []


def test_read_floor_counts_active_experts_and_the_latent_cache():
    torch.manual_seed(0)
    config = tiny_config()
    model = DeepSeekForCausalLM(config)
    routed = sum(p.numel() * 4 for n, p in model.named_parameters() if ".mlp.experts." in n and "layers.3." not in n)
    everything = step_weight_bytes(model, batch=10**6)  # every expert is selected
    one_token = step_weight_bytes(model, batch=1)
    k_over_e = config.num_experts_per_tok / config.n_routed_experts
    assert abs((everything - one_token) - routed * (1 - k_over_e)) < 1e-6 * everything
    mtp = sum(t.numel() * 4 for n, t in [*model.named_parameters(), *model.named_buffers()] if ".layers.3." in n)
    embed = config.vocab_size * config.hidden_size * 4
    all_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert abs(everything - (all_bytes - mtp - embed)) < 1e-6 * everything
    assert cache_bytes(config, 2, 100, 2) == 2 * 100 * (32 + 8) * 2 * config.num_hidden_layers


def test_compiled_step_takes_both_models_and_compiles_fp8_weights_per_shape(tmp_path):
    """The compiled rows build their step for transformers' peer and for ours; FP8 weights get one graph per shape,
    as `generate` compiles them (the compiled callable is lazy: nothing compiles on the CPU here)."""
    from transformers import DeepseekV3ForCausalLM

    from hf_deepseek.evals.bench import load
    from hf_deepseek.evals.bench_decode import TINY_DECODE_PLAN, compiled_step
    from hf_deepseek.modeling.fp8 import convert_to_fp8_inference

    torch.manual_seed(0)
    DeepSeekForCausalLM(tiny_config()).save_pretrained(tmp_path)
    peer = load(DeepseekV3ForCausalLM, tmp_path, torch.device("cpu"), torch.float32)
    assert callable(compiled_step(peer, TINY_DECODE_PLAN))
    assert peer._last_compile_config.dynamic == TINY_DECODE_PLAN.compile_dynamic
    ours = convert_to_fp8_inference(load(DeepSeekForCausalLM, tmp_path, torch.device("cpu"), torch.float32))
    assert callable(compiled_step(ours, TINY_DECODE_PLAN))
    assert ours._last_compile_config.dynamic is False


def test_per_row_batch_sizes_and_contexts_parse():
    from hf_deepseek.cli import build_parser
    from hf_deepseek.evals.bench_decode import plan_from_args

    args = build_parser().parse_args(
        ["bench", "decode", "--batch-sizes", "1,32", "--contexts", "2048,32768", "--row-batch-sizes",
         "ours-generate=1", "--row-contexts", "ours-generate=2048;transformers-generate=2048,4096"]
    )  # fmt: skip
    plan = plan_from_args(args)
    assert plan.row_batch_sizes == {"ours-generate": [1]}
    assert plan.row_contexts == {"ours-generate": [2048], "transformers-generate": [2048, 4096]}
    assert plan.contexts == [2048, 32768]


def test_alt_linear_rows_take_the_environment_configurations_for_the_row_only(monkeypatch):
    """`ours-fast-alt-linear` runs the dense layers' kernels at HF_DEEPSEEK_ALT_LINEAR_GEMV_CONFIG (FP8 weights at
    ..._FP8_CONFIG), the defaults before and after; FP8 rows run last, after every bf16 row asked."""
    from hf_deepseek.evals.bench_decode import row_switches, run_order
    from hf_deepseek.kernels import moe_gemv_config
    from hf_deepseek.kernels.moe_gemv_config import KernelConfig

    def linear_configs():
        return moe_gemv_config.LINEAR_CONFIG, moe_gemv_config.LINEAR_FP8_CONFIG

    before = linear_configs()
    monkeypatch.setenv("HF_DEEPSEEK_ALT_LINEAR_GEMV_CONFIG", "4,2048,4")
    monkeypatch.setenv("HF_DEEPSEEK_ALT_LINEAR_GEMV_FP8_CONFIG", "8,1024,8,1,2")
    with row_switches(STEP_ROWS["ours-fast-alt-linear"]):
        assert linear_configs() == (KernelConfig(4, 2048, 4, 1, None), KernelConfig(8, 1024, 8, 1, 2))
        assert moe_gemv_config.kernel_config(None, fp8=True, linear=True) == KernelConfig(8, 1024, 8, 1, 2)
    assert linear_configs() == before
    with row_switches(STEP_ROWS["ours-fast"]):
        assert linear_configs() == before
    monkeypatch.delenv("HF_DEEPSEEK_ALT_LINEAR_GEMV_FP8_CONFIG")
    with row_switches(STEP_ROWS["ours-fast-fp8-alt-linear"]):  # unset: the default
        assert linear_configs()[1] == before[1]
    rows = ["ours-fast-fp8-head", "ours-fast-fp8-alt-linear", "ours-generate-fp8", "ours-fast", "ours-fast-fp8",
            "ours-generate-trees"]  # fmt: skip
    assert run_order(rows) == [
        "ours-fast", "ours-generate-trees", "ours-fast-fp8-alt-linear", "ours-generate-fp8", "ours-fast-fp8",
        "ours-fast-fp8-head",
    ]  # fmt: skip


def test_fused_experts_rows_turn_the_switch_on_for_the_row_only():
    """`ours-fast-fused-experts` and `ours-fast-fp8-head-fused-experts` run a MoE layer's two kernels as one launch
    (moe_gemv.FUSED_EXPERTS), the environment's setting (off by default) before and after; the FP8 one runs with the
    rows that quantise the head."""
    from hf_deepseek.evals.bench_decode import FP8_HEAD_ROWS, ROWS, row_switches
    from hf_deepseek.kernels import moe_gemv

    before = moe_gemv.FUSED_EXPERTS
    for name in ("ours-fast-fused-experts", "ours-fast-fp8-head-fused-experts"):
        assert name in ROWS
        with row_switches(STEP_ROWS[name]):
            assert moe_gemv.FUSED_EXPERTS
        assert before == moe_gemv.FUSED_EXPERTS
    with row_switches(STEP_ROWS["ours-fast"]):
        assert before == moe_gemv.FUSED_EXPERTS
    assert "ours-fast-fp8-head-fused-experts" in FP8_HEAD_ROWS


@pytest.mark.gpu
def test_replayed_step_gives_the_compiled_steps_logits():
    """Our compiled step rows' step on CUDA: the compiled step (no Inductor CUDA graphs) captured once and replayed
    with new tokens and positions gives the logits of the same compiled step called each time, step after step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from hf_deepseek.evals.bench_decode import DecodePlan, compiled_step, filled_cache
    from hf_deepseek.evals.cuda_graph_timing import ReplayedStep

    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config()).cuda().bfloat16().eval()
    plan = DecodePlan(model.config.to_dict(), batch_sizes=[2], contexts=[16], compile_dynamic=False)
    step = compiled_step(model, plan, "default")
    tokens = torch.randint(3, model.config.vocab_size, (4, 2, 1), device="cuda")
    logits = {}
    for replay in (False, True):
        cache = filled_cache("latent", model, 2, 16, 32, "cuda", torch.bfloat16)
        run = ReplayedStep(step, rewind=lambda c=cache: c.set_length(16)) if replay else step
        with torch.no_grad():
            outs = []
            for i in range(4):
                position = torch.full((2, 1), 16 + i, device="cuda", dtype=torch.long)
                out = run(input_ids=tokens[i], position_ids=position, cache=cache, use_cache=True, logits_to_keep=1)
                outs.append(out.logits.float().clone())
        logits[replay] = outs
    for replayed, called in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(replayed, called, rtol=1e-2, atol=1e-2)
    assert int(cache.layer_length(0)) == 20  # four tokens written, the warm-up's taken back
