"""Multi-Token Prediction: loss composition and alignment, gradients, input order, depth > 1, packed masking,
and a short training run in which both the main and the MTP loss fall."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.modeling.mtp import MTPLayer, mtp_labels, shift_left


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets, computed without the model's loss function."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def capture_mtp_head_inputs(model: DeepSeekForCausalLM) -> tuple[list[torch.Tensor], list]:
    """Record the normed hidden state each MTP depth feeds to the shared output head."""
    seen, handles = [], []
    for layer in model.model.mtp_layers:
        handles.append(layer.shared_head.norm.register_forward_hook(lambda mod, args, out: seen.append(out)))
    return seen, handles


def test_mtp_layers_sit_after_the_decoder_layers():
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = DeepSeekForCausalLM(cfg)
    layers = model.model.layers
    assert len(layers) == cfg.num_hidden_layers + 2
    assert not any(isinstance(layer, MTPLayer) for layer in layers[: cfg.num_hidden_layers])
    assert all(isinstance(layer, MTPLayer) for layer in layers[cfg.num_hidden_layers :])
    names = {n for n, _ in model.named_parameters()}
    for k in range(2):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm"):
            assert f"{prefix}.{part}.weight" in names
        assert model.model.layers[cfg.num_hidden_layers + k].eh_proj.weight.shape == (64, 128)


def test_loss_is_main_ce_plus_weighted_mtp_loss():
    cfg = tiny_config(mtp_loss_weight=0.3)
    model = DeepSeekForCausalLM(cfg).eval()
    input_ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = input_ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[1, 9] = -100
    seen, handles = capture_mtp_head_inputs(model)
    out = model(input_ids, labels=labels)
    for h in handles:
        h.remove()

    main = ce(out.logits[:, :-1], labels[:, 1:])
    assert out.mtp_loss is not None and out.aux_loss is None
    torch.testing.assert_close(out.loss, main + 0.3 * out.mtp_loss)
    # depth 1 at position t predicts token t + 2, through the shared output head
    assert len(seen) == 1
    mtp_logits = model.lm_head(seen[0])
    torch.testing.assert_close(out.mtp_loss, ce(mtp_logits[:, :-2], labels[:, 2:]))


def test_mtp_loss_weight_scales_only_the_mtp_term():
    input_ids = torch.randint(0, 97, (2, 10))
    losses = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        model = DeepSeekForCausalLM(tiny_config(mtp_loss_weight=weight)).eval()
        losses[weight] = model(input_ids, labels=input_ids)
    torch.testing.assert_close(losses[1.0].loss - losses[0.0].loss, losses[1.0].mtp_loss)
    torch.testing.assert_close(losses[0.0].mtp_loss, losses[1.0].mtp_loss)


def test_no_mtp_layers_means_no_mtp_loss():
    cfg = tiny_config(num_nextn_predict_layers=0)
    model = DeepSeekForCausalLM(cfg).eval()
    assert len(model.model.layers) == cfg.num_hidden_layers
    assert not any(isinstance(m, MTPLayer) for m in model.modules())
    input_ids = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(input_ids, labels=input_ids)
    assert out.mtp_loss is None
    torch.testing.assert_close(out.loss, ce(out.logits[:, :-1], input_ids[:, 1:]))


def test_no_labels_means_no_mtp_work():
    model = DeepSeekForCausalLM(tiny_config()).eval()
    calls = []
    model.model.mtp_layers[0].eh_proj.register_forward_hook(lambda *a: calls.append(1))
    out = model(torch.randint(0, 97, (1, 8)))
    assert out.loss is None and out.mtp_loss is None
    assert calls == []


def test_every_mtp_parameter_gets_a_gradient():
    cfg = tiny_config()
    model = DeepSeekForCausalLM(cfg).train()
    input_ids = torch.randint(0, cfg.vocab_size, (4, 16))
    model(input_ids, labels=input_ids).loss.backward()
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    mtp_params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix)]
    names = {n for n, _ in mtp_params}
    assert {f"{prefix}{p}.weight" for p in ("enorm", "hnorm", "eh_proj")} <= names
    assert any(".mlp.experts." in n for n in names) and any(".self_attn." in n for n in names)
    for name, param in mtp_params:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_mtp_input_concatenates_embedding_first():
    """eh_proj's first d input columns see enorm(embedding of token t+1), the last d see hnorm(h_t)."""
    cfg = tiny_config()
    model = DeepSeekForCausalLM(cfg).eval()
    mtp = model.model.mtp_layers[0]
    with torch.no_grad():  # distinct norm weights, so the two halves cannot be confused
        mtp.enorm.weight.fill_(0.5)
        mtp.hnorm.weight.fill_(3.0)
    captured = []
    mtp.eh_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    input_ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(input_ids, labels=input_ids, output_hidden_states=True)

    d = cfg.hidden_size
    (eh_input,) = captured
    assert eh_input.shape == (2, 9, 2 * d)
    with torch.no_grad():
        next_embeds = shift_left(model.model.embed_tokens(input_ids), 1, 0.0)
        expected_first = mtp.enorm(next_embeds)
        expected_second = mtp.hnorm(out.hidden_states[-1])  # the main model's final, normed hidden state
    torch.testing.assert_close(eh_input[..., :d], expected_first)
    torch.testing.assert_close(eh_input[..., d:], expected_second)
    # the embedding half really comes from token t+1 (not token t)
    assert not torch.allclose(eh_input[:, :-1, :d], mtp.enorm(model.model.embed_tokens(input_ids))[:, :-1])


def test_depth_two_chains_and_predicts_three_ahead():
    cfg = tiny_config(num_nextn_predict_layers=2, mtp_loss_weight=0.5)
    model = DeepSeekForCausalLM(cfg).train()
    input_ids = torch.randint(0, cfg.vocab_size, (2, 14))
    seen, handles = capture_mtp_head_inputs(model)
    eh_inputs, block_out, hnorm_in = [], [], []
    first, second = model.model.mtp_layers
    for layer in (first, second):
        handles.append(layer.eh_proj.register_forward_pre_hook(lambda mod, args: eh_inputs.append(args[0])))
    head_norm = first.shared_head.norm
    handles.append(head_norm.register_forward_pre_hook(lambda mod, args: block_out.append(args[0])))
    handles.append(second.hnorm.register_forward_pre_hook(lambda mod, args: hnorm_in.append(args[0])))
    out = model(input_ids, labels=input_ids)
    for h in handles:
        h.remove()
    assert len(seen) == 2
    # depth k sees the embedding of token t+k; depth 2 chains on depth 1's block output (before its head norm)
    d, embeds = cfg.hidden_size, model.model.embed_tokens(input_ids)
    torch.testing.assert_close(eh_inputs[0][..., :d], first.enorm(shift_left(embeds, 1, 0.0)))
    torch.testing.assert_close(eh_inputs[1][..., :d], second.enorm(shift_left(embeds, 2, 0.0)))
    torch.testing.assert_close(hnorm_in[0], block_out[0], atol=0, rtol=0)
    ce1 = ce(model.lm_head(seen[0])[:, :-2], input_ids[:, 2:])  # depth 1: token t+2
    ce2 = ce(model.lm_head(seen[1])[:, :-3], input_ids[:, 3:])  # depth 2: token t+3
    torch.testing.assert_close(out.mtp_loss, (ce1 + ce2) / 2)
    main = ce(out.logits[:, :-1], input_ids[:, 1:])
    torch.testing.assert_close(out.loss, main + 0.5 * out.mtp_loss)

    out.loss.backward()
    for k in range(2):
        layer = model.model.layers[cfg.num_hidden_layers + k]
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"depth {k + 1}: {name}"


def test_depth_longer_than_sequence_gives_zero_not_nan():
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = DeepSeekForCausalLM(cfg).eval()
    input_ids = torch.randint(0, cfg.vocab_size, (1, 3))  # depth 2 would need a 4th token
    out = model(input_ids, labels=input_ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss)


def expected_mtp_targets(labels, depth, position_ids):
    """Reference: position t predicts labels[t+1+depth] when it is in t's document, stored at index t+1."""
    out = torch.full_like(labels, -100)
    batch, length = labels.shape
    for b in range(batch):
        for t in range(length):
            j = t + 1 + depth
            if j < length and (position_ids is None or position_ids[b, j] == position_ids[b, t] + 1 + depth):
                out[b, t + 1] = labels[b, j]
    return out


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_labels_mask_targets_across_document_boundaries(depth):
    labels = torch.arange(100, 112)[None]  # one packed row: documents of 5, 4 and 3 tokens
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]])
    target = mtp_labels(labels, depth, position_ids)
    expected = expected_mtp_targets(labels, depth, position_ids)
    # index 0 is never read: the loss compares logits[t] with target[t + 1]
    assert torch.equal(target[:, 1:], expected[:, 1:])
    if depth == 1:
        # document 1 (tokens 100..104): positions 0..2 predict 102..104; positions 3, 4 would cross into doc 2
        assert target[0, 1:6].tolist() == [102, 103, 104, -100, -100]
    # no target ever comes from another document
    for t in range(labels.shape[1] - 1):
        if target[0, t + 1] != -100:
            src = int(target[0, t + 1]) - 100
            assert position_ids[0, src] - position_ids[0, t] == 1 + depth


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_labels_without_position_ids_is_a_plain_shift(depth):
    labels = torch.randint(0, 50, (2, 9))
    labels[1, 4] = -100
    target = mtp_labels(labels, depth, None)
    assert torch.equal(target[:, 1:], expected_mtp_targets(labels, depth, None)[:, 1:])
    # unpacked position ids (0..T-1 per row) change nothing
    position_ids = torch.arange(9).expand(2, 9)
    assert torch.equal(mtp_labels(labels, depth, position_ids)[:, 1:], target[:, 1:])


def test_packed_batch_mtp_loss_equals_separate_documents():
    """Padding-free packing (position_ids restart per document) gives the per-document losses."""
    cfg = tiny_config()
    model = DeepSeekForCausalLM(cfg).train()  # training: no cache, so transformers builds the packed mask
    doc_a, doc_b = torch.randint(0, cfg.vocab_size, (1, 7)), torch.randint(0, cfg.vocab_size, (1, 5))
    packed = torch.cat([doc_a, doc_b], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    labels = packed.clone()
    labels[0, 7] = -100  # as DataCollatorWithFlattening does: a document's first token is not a target

    seen, handles = capture_mtp_head_inputs(model)
    out = model(packed, position_ids=position_ids, labels=labels)
    out_a = model(doc_a, labels=doc_a)
    out_b = model(doc_b, labels=doc_b)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out.logits[:, :7], out_a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[:, 7:], out_b.logits, atol=1e-5, rtol=1e-5)
    # the last position of document a sees the next document's first embedding, but has no MTP target
    torch.testing.assert_close(seen[0][:, :6], seen[1][:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0][:, 7:], seen[2], atol=1e-5, rtol=1e-5)
    # MTP targets: 5 in document a (t+2 <= 6), 3 in document b; nothing across the boundary
    expected = (5 * out_a.mtp_loss + 3 * out_b.mtp_loss) / 8
    torch.testing.assert_close(out.mtp_loss, expected, atol=1e-5, rtol=1e-5)


def arithmetic_sequences(batch: int, length: int, vocab: int) -> torch.Tensor:
    """x_t = (start + step * t) mod vocab, with a per-sequence step in {1, 2, 3}: after two tokens both the
    next token and the one after it are determined, so both the main and the MTP head can learn them."""
    start = torch.randint(0, vocab, (batch, 1))
    step = torch.randint(1, 4, (batch, 1))
    return (start + step * torch.arange(length)) % vocab


def test_training_lowers_main_and_mtp_loss():
    torch.manual_seed(0)
    cfg = tiny_config(mtp_loss_weight=1.0)
    model = DeepSeekForCausalLM(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(250):
        batch = arithmetic_sequences(16, 24, cfg.vocab_size)
        out = model(batch, labels=batch)
        main = out.loss - cfg.mtp_loss_weight * out.mtp_loss
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((main.item(), out.mtp_loss.item()))
    first_main, first_mtp = history[0]
    last_main = sum(m for m, _ in history[-10:]) / 10
    last_mtp = sum(m for _, m in history[-10:]) / 10
    assert first_main > 3.5 and first_mtp > 3.5  # about ln(97) at initialisation
    assert last_main < 0.5 * first_main, history[-10:]
    assert last_mtp < 0.5 * first_mtp, history[-10:]

    # and the trained MTP head predicts two tokens ahead on fresh sequences
    model.eval()
    seen, handles = capture_mtp_head_inputs(model)
    batch = arithmetic_sequences(8, 20, cfg.vocab_size)
    with torch.no_grad():
        model(batch, labels=batch)
    for h in handles:
        h.remove()
    predicted = model.lm_head(seen[0]).argmax(-1)[:, 2:-2]  # from position 2 on, the step is known
    accuracy = (predicted == batch[:, 4:]).float().mean()
    assert accuracy > 0.8, accuracy


@pytest.mark.parametrize("aux_loss_alpha", [0.0, 0.01])
def test_gradient_accumulation_with_num_items_in_batch_matches_full_batch(aux_loss_alpha):
    """transformers' Trainer passes `num_items_in_batch` (label tokens of all accumulated micro-batches, all
    ranks) and then sums the micro-batch losses without dividing them: the sum must equal the full-batch loss,
    MTP and balance terms included, or those terms get weighted by the number of accumulation steps."""
    cfg = tiny_config(aux_loss_alpha=aux_loss_alpha, mtp_loss_weight=0.3)
    model = DeepSeekForCausalLM(cfg).train()
    batch = torch.randint(0, cfg.vocab_size, (4, 12))
    full = model(batch, labels=batch)
    total_items = (batch[:, 1:] != -100).sum()
    micro = [model(part, labels=part, num_items_in_batch=total_items) for part in batch.split(2)]
    torch.testing.assert_close(sum(out.loss for out in micro), full.loss)
    # the reported parts stay per-micro-batch means
    torch.testing.assert_close((micro[0].mtp_loss + micro[1].mtp_loss) / 2, full.mtp_loss)
    if aux_loss_alpha:
        torch.testing.assert_close((micro[0].aux_loss + micro[1].aux_loss) / 2, full.aux_loss)

    router = model.model.layers[1].mlp.gate.weight
    grads_full = torch.autograd.grad(full.loss, router)[0]
    micro = [model(part, labels=part, num_items_in_batch=total_items) for part in batch.split(2)]
    grads_micro = torch.autograd.grad(sum(out.loss for out in micro), router)[0]
    torch.testing.assert_close(grads_micro, grads_full)


def test_a_training_forward_without_position_ids_makes_no_host_read_for_the_causal_mask(monkeypatch):
    """Without position ids the model makes them, one sequence a row: transformers' search for packed sequences in
    them (a host read of a device tensor, a GPU sync every training step, and under CUDA graph capture a mask made
    dense) is skipped; the loss is the one with those position ids given."""
    import traceback

    cfg = tiny_config()
    model = DeepSeekForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    reads = []
    real_bool = torch.Tensor.__bool__

    def recording_bool(tensor):
        reads.append([frame.filename for frame in traceback.extract_stack()])
        return real_bool(tensor)

    monkeypatch.setattr(torch.Tensor, "__bool__", recording_bool)
    loss = model(ids, labels=ids).loss
    assert not any("masking_utils" in name for stack in reads for name in stack)
    given = model(ids, labels=ids, position_ids=torch.arange(9)[None].expand(2, -1)).loss
    assert any("masking_utils" in name for stack in reads for name in stack)  # given ids are still searched
    torch.testing.assert_close(loss, given, atol=0, rtol=0)


def test_a_plain_causal_pass_under_sdpa_takes_no_mask_even_where_transformers_would_make_one(monkeypatch):
    """Training without mask, cache or position ids: SDPA's is_causal and no mask tensor, as transformers decides
    outside tracing. transformers 5.17 declines that skip while a CUDA graph is captured (simulated here by its
    skip check answering no), and a captured training step compiled without a mask would then see one. The loss
    is the one with the mask transformers makes."""
    from transformers import masking_utils

    cfg = tiny_config()
    model = DeepSeekForCausalLM(cfg).train()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    embeds = model.model.embed_tokens(ids)
    assert model.model.attention_inputs(embeds, None, None, None)[0] is None
    plain = model(ids, labels=ids).loss
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)
    assert model.model.attention_inputs(embeds, None, None, None)[0] is None
    positions = torch.arange(9)[None].expand(2, -1)
    mask = model.model.attention_inputs(embeds, None, positions, None)[0]
    assert mask is not None and mask.dtype == torch.bool  # given positions: transformers' mask, materialised
    torch.testing.assert_close(model(ids, labels=ids, position_ids=positions).loss, plain, atol=1e-6, rtol=1e-6)
