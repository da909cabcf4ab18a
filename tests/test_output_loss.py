"""The chunked output head + cross-entropy (`modeling/output_loss.py`) against transformers' own loss on full
logits: the same loss and the same gradients for every parameter, main and MTP losses, padding, and the Trainer's
`num_items_in_batch`. Each chunk's Triton kernel (`kernels/_cross_entropy_triton.py`) against the torch terms and
float64: on the GPU, and in Triton's interpreter on the CPU where triton imports and TRITON_INTERPRET=1 is set (as
`benchmarks/triton_interpreter_check.py` runs it, section `cross_entropy`)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling import output_loss
from hf_deepseek.modeling.output_loss import causal_lm_loss, enable_fused_output_loss

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def losses_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 37])
def test_fused_output_loss_equals_the_full_logits_loss_and_gradients(num_items):
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config(tie_word_embeddings=False)).train()
    ids = torch.randint(0, 97, (3, 20))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    plain, plain_grads = losses_and_grads(model, ids, labels, **kwargs)
    enable_fused_output_loss(model, chunks=4)  # 60 rows: chunks of 15
    fused, fused_grads = losses_and_grads(model, ids, labels, **kwargs)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.mtp_loss, plain.mtp_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and "lm_head.weight" in fused_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()  # outside training the logits come back
    assert model(ids, labels=labels).logits is not None


def test_fused_output_loss_takes_shift_labels():
    torch.manual_seed(2)
    model = DeepSeekForCausalLM(tiny_config(num_nextn_predict_layers=0)).train()
    ids = torch.randint(0, 97, (2, 12))
    shift = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    shift[1, :4] = -100
    plain = model(ids, shift_labels=shift).loss
    enable_fused_output_loss(model, chunks=3)
    torch.testing.assert_close(model(ids, shift_labels=shift).loss, plain, rtol=1e-5, atol=1e-6)


def test_chunked_loss_scales_with_the_incoming_gradient():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    (3.0 * causal_lm_loss(hidden, head, labels, chunks=3)).backward()
    want_hidden = hidden.detach().clone().requires_grad_(True)
    logits = head(want_hidden)
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    want_hidden_grad, want_weight_grad = torch.autograd.grad(3.0 * plain, [want_hidden, head.weight])
    torch.testing.assert_close(hidden.grad, want_hidden_grad)
    torch.testing.assert_close(head.weight.grad, want_weight_grad)


def test_bf16_head_and_hidden_gradients_match_float64():
    """bf16 operands over 8 chunks: each chunk's products rounded to bf16, the head's gradient summed over the chunks
    by the GEMMs in bf16 (fp32 sums inside each), within bf16 rounding of the float64 gradients."""
    torch.manual_seed(3)
    head = torch.nn.Linear(64, 300, bias=False).bfloat16()
    hidden = torch.randn(4, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (4, 64))
    causal_lm_loss(hidden, head, labels, chunks=8).backward()
    want_hidden = hidden.detach().double().requires_grad_(True)
    weight = head.weight.detach().double().requires_grad_(True)
    logits = want_hidden[:, :-1] @ weight.t()
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), labels[:, 1:].reshape(-1))
    for got, want in zip(
        (hidden.grad, head.weight.grad), torch.autograd.grad(plain, [want_hidden, weight]), strict=True
    ):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_bf16_gradients_scaled_in_place_equal_the_scaled_copies():
    """The backward scales the saved bf16 gradients in place: the same bits as scaling copies of them (fp32
    products rounded once to bf16, the incoming gradient cast to bf16 for the hidden rows)."""
    torch.manual_seed(4)
    head = torch.nn.Linear(32, 70, bias=False).bfloat16()
    hidden = torch.randn(2, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 70, (2, 16))
    causal_lm_loss(hidden, head, labels, chunks=4).backward()
    unit_hidden, unit_weight = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    scale = torch.tensor(2.7)
    (causal_lm_loss(hidden, head, labels, chunks=4) * scale).backward()
    assert torch.equal(head.weight.grad, (unit_weight.float() * scale).to(torch.bfloat16))
    assert torch.equal(hidden.grad, unit_hidden * scale.to(torch.bfloat16))


def test_chunk_gradient_written_over_the_logits_equals_the_separate_one():
    """Each chunk's gradient is written over its logits (one [c, V] buffer, not two): the same loss and the same
    bits as the gradient in a buffer of its own, eager and traced whole by torch.compile (the mutation of an input
    inside the loss's autograd function)."""
    from hf_deepseek.modeling.output_loss import _chunk_terms, _chunk_terms_over_logits

    torch.manual_seed(6)
    logits = torch.randn(12, 50, dtype=torch.bfloat16) * 3
    targets = torch.randint(0, 50, (12,))
    targets[3] = -100
    scale = torch.tensor(0.125)
    want_loss, want_grad = _chunk_terms(logits, targets, scale)
    for fn in (_chunk_terms_over_logits, torch.compile(_chunk_terms_over_logits, backend="aot_eager", fullgraph=True)):
        buffer = logits.clone()
        loss = fn(buffer, targets, scale)
        assert torch.equal(loss, want_loss) and torch.equal(buffer, want_grad)

    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 8, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 8))
    causal_lm_loss(hidden, head, labels, chunks=3).backward()
    want = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    compiled = torch.compile(causal_lm_loss, backend="aot_eager", fullgraph=True)
    compiled(hidden, head, labels, chunks=3).backward()
    torch.testing.assert_close((hidden.grad, head.weight.grad), want, rtol=1e-6, atol=1e-7)


def float64_terms(logits: torch.Tensor, targets: torch.Tensor, scale: float):
    """(loss sum, gradient) of one chunk in float64: what `_chunk_terms` computes, exactly."""
    x, valid = logits.double(), targets != -100
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), logits.shape[1]).double() * valid[:, None]
    loss = ((x.logsumexp(dim=-1) - (x * onehot).sum(dim=-1)) * valid).sum()
    return loss, (x.softmax(dim=-1) - onehot) * (valid[:, None] * scale)


def within_rounding(got: torch.Tensor, want: torch.Tensor, scale: float) -> bool:
    """got within half a unit in the last place of its dtype of the float64 value, plus the fp32 arithmetic's error
    (measured up to 2^-19 relative, 2^-22 of the scale where p - 1 cancels at the target)."""
    half_ulp = torch.finfo(got.dtype).eps / 2
    tolerance = (half_ulp + 2**-18) * want.abs() + 2**-18 * scale
    return bool(((got.double() - want).abs() <= tolerance).all())


def chunk_case(rows: int, vocab: int, dtype: torch.dtype, device="cpu"):
    """Logits with a shifted row (a large max), targets at both ends and ignored rows."""
    logits = torch.randn(rows, vocab, device=device) * 3
    logits[4] += 40
    targets = torch.randint(0, vocab, (rows,), device=device)
    targets[1], targets[2], targets[3], targets[rows - 2] = -100, 0, vocab - 1, -100
    return logits.to(dtype), targets


def gpu_store_rounding():
    """The check script's context (the interpreter's float32-to-bf16 conversion rounding to nearest even, as the GPU
    does); imported only under the interpreter, where the script loads."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from triton_interpreter_check import gpu_store_rounding as store_rounding

    return store_rounding()


@pytest.mark.skipif(not INTERPRETER, reason="Triton's interpreter: TRITON_INTERPRET=1 and triton importable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("vocab", "options"), [(1000, {}), (5000, {}), (5000, {"block": 1024}), (1000, {"programs": 4})]
)
def test_triton_chunk_kernel_equals_the_torch_terms_in_the_interpreter(dtype, vocab, options):
    """One block a row with a masked tail, and several (5000 in blocks of 1024); a persistent grid of 4 programs
    over 9 rows: the loss as `_chunk_terms`'s and float64's to fp32 rounding, the gradient within rounding of
    float64, ignored rows zero."""
    from hf_deepseek.kernels._cross_entropy_triton import cross_entropy_rows_in_place

    torch.manual_seed(vocab)
    logits, targets = chunk_case(9, vocab, dtype)
    scale = torch.tensor(0.37)
    want_loss, want_grad = float64_terms(logits, targets, 0.37)
    torch_loss, _ = output_loss._chunk_terms(logits, targets, scale)
    buffer = logits.clone()
    with gpu_store_rounding():
        loss = cross_entropy_rows_in_place(buffer, targets, scale, **options)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, torch_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    assert buffer.dtype == dtype and within_rounding(buffer, want_grad, 0.37)
    assert not buffer[targets == -100].any() and buffer[2, 0] < 0 and buffer[3, -1] < 0


def test_the_loss_op_writes_the_torch_terms_over_the_logits_when_traced():
    """The custom op (the kernel on CUDA, `_chunk_terms_over_logits` elsewhere): its fake and declared mutation
    (`opcheck`), and the same loss and gradient bits eager and traced whole by torch.compile."""
    torch.manual_seed(7)
    logits, targets = chunk_case(12, 50, torch.bfloat16)
    scale = torch.tensor(0.125)
    want_loss, want_grad = output_loss._chunk_terms(logits, targets, scale)
    op = output_loss.cross_entropy_rows_in_place
    torch.library.opcheck(op, (logits.clone(), targets, scale))
    for fn in (op, torch.compile(lambda *args: op(*args) * 1.0, backend="aot_eager", fullgraph=True)):
        buffer = logits.clone()
        loss = fn(buffer, targets, scale)
        assert torch.equal(loss, want_loss) and torch.equal(buffer, want_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [None, 20])
def test_triton_chunk_kernel_on_the_gpu(programs):
    """At DeepSeek-V3's vocabulary in bf16, a program a row and a persistent grid: the loss as the torch terms' and
    float64's to fp32 rounding, the gradient within rounding of float64 (the GPU's approximate exp and log inside
    the fp32 margin)."""
    from hf_deepseek.kernels._cross_entropy_triton import cross_entropy_rows_in_place

    torch.manual_seed(8)
    logits, targets = chunk_case(64, 129280, torch.bfloat16, device="cuda")
    scale = torch.tensor(0.37, device="cuda")
    want_loss, want_grad = float64_terms(logits, targets, 0.37)
    torch_loss, _ = output_loss._chunk_terms(logits, targets, scale)
    buffer = logits.clone()
    loss = cross_entropy_rows_in_place(buffer, targets, scale, programs=programs)
    torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
    assert within_rounding(buffer, want_grad, 0.37)
    assert not buffer[targets == -100].any()


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_loss_with_the_kernel_equals_the_plain_head_on_the_gpu(compiled):
    """A bf16 head at DeepSeek-V3's vocabulary, with the kernel in each chunk, eager and inside a compiled region
    (the custom op): the loss as F.cross_entropy of the plain head's logits, the gradients within bf16 rounding of
    float64's."""
    assert output_loss.TRITON_LOSS
    torch.manual_seed(9)
    head = torch.nn.Linear(256, 129280, bias=False, device="cuda").bfloat16()
    hidden = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 129280, (2, 300), device="cuda")
    labels[0, :40] = -100
    loss_fn = torch.compile(causal_lm_loss, fullgraph=True) if compiled else causal_lm_loss
    loss = loss_fn(hidden, head, labels, chunks=4)
    loss.backward()
    plain = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].float().reshape(-1, 129280), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, plain, rtol=1e-4, atol=0)
    want_hidden = hidden.detach().double().requires_grad_(True)
    weight = head.weight.detach().double().requires_grad_(True)
    exact = torch.nn.functional.cross_entropy((want_hidden[:, :-1] @ weight.t()).reshape(-1, 129280),
                                              labels[:, 1:].flatten())  # fmt: skip
    for got, want in zip((hidden.grad, head.weight.grad), torch.autograd.grad(exact, [want_hidden, weight]),
                         strict=True):  # fmt: skip
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
