"""The training bench's captured step (`evals/graphed_train_step.py`): on a GPU, replaying the CUDA graph of a whole
step (forward, backward, `TritonAdamW(capturable=True)`) trains as the plain step does; the optimizer's state reset
in place is a fresh optimizer's (also through the bench's `--loss-seeds`, test_bench_train.py)."""

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.evals.graphed_train_step import GraphedTrainStep, eager_step, reset_optimizer_state
from hf_deepseek.generation.step_graphs import warm_up
from hf_deepseek.kernels.adamw import TritonAdamW
from hf_deepseek.modeling.compile_regions import compile_for_training


def batches(vocab: int, count: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (2, 24), generator=gen).to(device) for _ in range(count)]


def test_a_state_reset_in_place_trains_as_a_fresh_optimizer():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DeepSeekForCausalLM(cfg).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = TritonAdamW(model.parameters(), lr=1e-2)
    step, data = eager_step(model, optimizer), batches(cfg.vocab_size, 3, "cpu")
    first = [float(step(ids)) for ids in data]
    model.load_state_dict(initial)
    reset_optimizer_state(optimizer)
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in optimizer.state.values())
    assert [float(step(ids)) for ids in data] == first


def test_a_model_keeping_fp8_weight_copies_is_refused_before_any_capture():
    from hf_deepseek.modeling.fp8 import FP8Recipe, convert_to_fp8_training

    model = DeepSeekForCausalLM(tiny_config()).train()
    convert_to_fp8_training(model, FP8Recipe.named("rowwise", backend="emulated", cache_weights=True))
    with pytest.raises(ValueError, match=r"cannot keep FP8 weight copies \(FP8Recipe.cache_weights\)"):
        GraphedTrainStep(model, TritonAdamW(model.parameters()), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.gpu
def test_replayed_step_trains_as_the_plain_step_on_the_gpu():
    """Two plain steps (on a side stream, as the bench warms up), the capture, then four replays: each step's loss
    and the final weights as six plain steps give them, up to the float32 rounding of AdamW's bias corrections
    (which may move a bf16 weight by one rounding)."""
    cfg = tiny_config(num_nextn_predict_layers=0)  # as the bench: bf16 (the experts' grouped GEMMs), compiled blocks
    torch.manual_seed(0)
    graphed_model = DeepSeekForCausalLM(cfg).cuda().bfloat16().train()
    plain_model = DeepSeekForCausalLM(cfg).cuda().bfloat16().train()
    plain_model.load_state_dict(graphed_model.state_dict())
    for model in (graphed_model, plain_model):
        compile_for_training(model)
    data = batches(cfg.vocab_size, 6, "cuda")
    plain = eager_step(plain_model, TritonAdamW(plain_model.parameters(), lr=1e-2))
    want = [float(plain(ids)) for ids in data]

    optimizer = TritonAdamW(graphed_model.parameters(), lr=1e-2, capturable=True)
    got = warm_up(lambda: [float(eager_step(graphed_model, optimizer)(ids)) for ids in data[:2]])
    step = GraphedTrainStep(graphed_model, optimizer, data[2])
    got += [float(step(ids)) for ids in data[2:]]
    assert got == pytest.approx(want, rel=1e-3)
    assert got[-1] < got[0]
    for a, b in zip(graphed_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # bf16's tolerance: a bias correction's float32 rounding may move one
    with pytest.raises(ValueError, match=r"a captured training step takes batches of shape \(2, 24\), got \(1, 24\)"):
        step(data[0][:1])
