"""The chunked output head + cross-entropy (`modeling/output_loss.py`) against transformers' own loss on full
logits: the same loss and the same gradients for every parameter, main and MTP losses, padding, and the Trainer's
`num_items_in_batch`."""

import pytest
import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling.output_loss import causal_lm_loss, enable_fused_output_loss


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
