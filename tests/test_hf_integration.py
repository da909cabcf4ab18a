"""The model as a transformers citizen: Auto classes, save/load in the official layout, pipeline, generation,
gradient checkpointing, dtypes, meta-device and device_map loading, attention backends, MoE outputs."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)

import hf_deepseek
from hf_deepseek import DeepSeekConfig, DeepSeekForCausalLM, DeepSeekModel

PAD, BOS, EOS = 2, 0, 1


def randomize_all(model: DeepSeekForCausalLM) -> DeepSeekForCausalLM:
    """Make every tensor distinctive: norms away from 1, correction biases away from 0 (MTP layer too)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the whole vocabulary: `<bos> <eos> <pad> <unk> w4 ... w{vocab-1}`."""
    vocab = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture
def saved_model(tmp_path):
    """A randomised tiny model and its tokenizer saved to one directory; returns (model, directory)."""
    model = randomize_all(DeepSeekForCausalLM(tiny_config(pad_token_id=PAD))).eval()
    model.save_pretrained(tmp_path)
    build_tokenizer(model.config.vocab_size).save_pretrained(tmp_path)
    return model, tmp_path


def test_auto_classes_are_registered():
    assert hf_deepseek.DeepSeekConfig.model_type == "hf_deepseek"
    default = AutoConfig.for_model("hf_deepseek")
    assert isinstance(default, DeepSeekConfig)
    assert default.n_routed_experts == 256  # DeepSeek-V3's own numbers
    cfg = AutoConfig.for_model("hf_deepseek", hidden_size=64, vocab_size=97)
    assert isinstance(cfg, DeepSeekConfig)
    assert cfg.hidden_size == 64 and cfg.vocab_size == 97
    model = AutoModelForCausalLM.from_config(tiny_config())
    assert type(model) is DeepSeekForCausalLM
    assert type(AutoModel.from_config(tiny_config())) is DeepSeekModel


def test_save_load_round_trip_is_bit_exact(saved_model):
    model, path = saved_model
    assert (path / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is DeepSeekForCausalLM
    expected_config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"} == expected_config

    expected, actual = model.state_dict(), loaded.state_dict()
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
    # the non-zero correction biases really made it (main layers and the MTP layer)
    biases = [n for n in expected if n.endswith("e_score_correction_bias")]
    assert f"model.layers.{model.config.num_hidden_layers}.mlp.gate.e_score_correction_bias" in biases
    assert all(actual[n].abs().sum() > 0 for n in biases)

    input_ids = torch.randint(4, 97, (2, 10))
    with torch.no_grad():
        before, after = model(input_ids, labels=input_ids), loaded(input_ids, labels=input_ids)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.mtp_loss, after.mtp_loss)


def test_auto_model_loads_the_backbone(saved_model):
    model, path = saved_model
    backbone = AutoModel.from_pretrained(path).eval()
    assert type(backbone) is DeepSeekModel
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[f"model.{name}"]), name
    input_ids = torch.randint(4, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(input_ids).last_hidden_state, model.model(input_ids).last_hidden_state, atol=0, rtol=0
        )


def test_checkpoint_uses_official_layout_in_safetensors(saved_model):
    model, path = saved_model
    cfg = model.config
    files = sorted(p.name for p in path.iterdir())
    weight_files = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))]
    assert weight_files and all(f.endswith(".safetensors") for f in weight_files), files
    assert json.loads((path / "config.json").read_text())["model_type"] == "hf_deepseek"

    tensors = {}
    for name in weight_files:
        with safe_open(path / name, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 - safe_open has no iteration

    # no stacked expert tensors on disk; one tensor per expert and projection
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in tensors)
    state = model.state_dict()
    inter = cfg.moe_intermediate_size
    moe_layers = [i for i in range(len(model.model.layers)) if cfg.is_moe_layer(i)]
    assert moe_layers == [1, 2, 3]
    for i in moe_layers:
        gate_up = state[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        down = state[f"model.layers.{i}.mlp.experts.down_proj"]
        for e in range(cfg.n_routed_experts):
            prefix = f"model.layers.{i}.mlp.experts.{e}"
            assert torch.equal(tensors[f"{prefix}.gate_proj.weight"], gate_up[e, :inter])
            assert torch.equal(tensors[f"{prefix}.up_proj.weight"], gate_up[e, inter:])
            assert torch.equal(tensors[f"{prefix}.down_proj.weight"], down[e])
            assert tensors[f"{prefix}.gate_proj.weight"].shape == (inter, cfg.hidden_size)
        assert f"model.layers.{i}.mlp.gate.weight" in tensors
        assert f"model.layers.{i}.mlp.gate.e_score_correction_bias" in tensors
        assert f"model.layers.{i}.mlp.shared_experts.gate_proj.weight" in tensors
    assert f"model.layers.2.mlp.experts.{cfg.n_routed_experts}.gate_proj.weight" not in tensors
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # the dense first layer

    mtp = f"model.layers.{cfg.num_hidden_layers}"
    for part in ("enorm", "hnorm", "eh_proj", "embed_tokens", "shared_head.norm", "shared_head.head"):
        assert f"{mtp}.{part}.weight" in tensors, part
    assert torch.equal(tensors[f"{mtp}.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(tensors[f"{mtp}.shared_head.head.weight"], state["lm_head.weight"])
    assert torch.equal(tensors[f"{mtp}.eh_proj.weight"], state[f"{mtp}.eh_proj.weight"])
    assert f"model.layers.{cfg.num_hidden_layers + 1}.enorm.weight" not in tensors


def test_sharded_checkpoint_round_trip(tmp_path):
    # experts of one layer spread over several shards must still merge back into the stacked tensors
    model = randomize_all(DeepSeekForCausalLM(tiny_config())).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 5
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    layer1_files = {f for k, f in index.items() if k.startswith("model.layers.1.mlp.experts.")}
    assert len(layer1_files) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_tied_embeddings_round_trip(tmp_path):
    model = randomize_all(DeepSeekForCausalLM(tiny_config(tie_word_embeddings=True))).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_text_generation_pipeline(saved_model):
    model, path = saved_model
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    generator = pipeline("text-generation", model=str(path), tokenizer=tokenizer)
    assert type(generator.model) is DeepSeekForCausalLM
    prompt = "w5 w6 w7 w8"
    (result,) = generator(prompt, max_new_tokens=6, do_sample=False)
    assert result["generated_text"].startswith(prompt)

    (ids,) = generator(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = model.generate(prompt_ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert ids["generated_token_ids"] == direct[0].tolist()
    assert len(direct[0]) > prompt_ids.shape[1]
    new_text = tokenizer.decode(direct[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert result["generated_text"].replace(" ", "") == (prompt + new_text).replace(" ", "")


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_matches_plain_backward(enable):
    model = DeepSeekForCausalLM(tiny_config(aux_loss_alpha=1e-2))
    if not hasattr(model, enable):
        pytest.skip(f"{enable} not in this transformers version")
    checkpointed = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24 renamed the method
        getattr(checkpointed, enable)()
    assert checkpointed.model.gradient_checkpointing
    input_ids = torch.randint(0, 97, (2, 12))

    def step(m):
        m.train()
        calls = []
        hook = m.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
        out = m(input_ids, labels=input_ids)
        out.loss.backward()
        hook.remove()
        return out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, len(calls)

    out_plain, grads_plain, calls_plain = step(model)
    out_ckpt, grads_ckpt, calls_ckpt = step(checkpointed)
    assert calls_plain == 1 and calls_ckpt == 2  # the checkpointed layer ran again during backward
    torch.testing.assert_close(out_ckpt.loss, out_plain.loss)
    torch.testing.assert_close(out_ckpt.mtp_loss, out_plain.mtp_loss)
    torch.testing.assert_close(out_ckpt.aux_loss, out_plain.aux_loss)
    assert set(grads_ckpt) == set(grads_plain)
    assert len(grads_plain) == len(list(model.parameters()))
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_forward_and_backward(saved_model):
    model, path = saved_model
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    # the router stays in fp32, as the official checkpoint keeps it
    assert bf16.model.layers[1].mlp.gate.weight.dtype == torch.float32
    for i in (1, 2, 3):
        gate = bf16.model.layers[i].mlp.gate
        assert gate.e_score_correction_bias.dtype == torch.float32
        original = model.model.layers[i].mlp.gate
        assert torch.equal(gate.e_score_correction_bias, original.e_score_correction_bias)
        assert torch.equal(gate.weight, original.weight)
    input_ids = torch.randint(4, 97, (2, 10))
    out = bf16(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss)
    with torch.no_grad():
        reference = model(input_ids).logits
    assert (out.logits.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.05
    out.loss.backward()
    assert bf16.model.layers[0].self_attn.kv_b_proj.weight.grad.dtype == torch.bfloat16

    cast = DeepSeekForCausalLM(tiny_config()).to(torch.bfloat16)
    logits = cast(input_ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_meta_device_init():
    cfg = tiny_config()
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    reference = DeepSeekForCausalLM(cfg)
    shapes = {n: p.shape for n, p in reference.named_parameters()}
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    model.model.rotary_emb.inv_freq.copy_(reference.model.rotary_emb.inv_freq)  # non-persistent buffer
    input_ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids).logits, reference.eval()(input_ids).logits)


def test_from_pretrained_with_device_map_auto(saved_model):
    pytest.importorskip("accelerate")
    model, path = saved_model
    loaded = AutoModelForCausalLM.from_pretrained(path, device_map="auto").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # accelerate fills the GPU first when there is one
    assert all(p.device.type == device for p in loaded.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].cpu(), tensor), name
    input_ids = torch.randint(4, 97, (2, 9))
    with torch.no_grad():
        expected = model(input_ids).logits
        torch.testing.assert_close(loaded(input_ids.to(device)).logits.cpu(), expected, atol=1e-4, rtol=0)


def test_eager_and_sdpa_agree(saved_model):
    _, path = saved_model
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    input_ids = torch.randint(4, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids).logits, sdpa(input_ids).logits, atol=1e-5, rtol=1e-5)
        # with left padding: compare the real tokens
        mask = torch.ones_like(input_ids)
        mask[1, :4] = 0
        a = eager(input_ids, attention_mask=mask).logits
        b = sdpa(input_ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
    # training losses agree too (MTP modules use the same attention)
    e, s = eager.train()(input_ids, labels=input_ids), sdpa.train()(input_ids, labels=input_ids)
    torch.testing.assert_close(e.mtp_loss, s.mtp_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_generation_matches_single(saved_model, attn):
    _, path = saved_model
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    prompts = [torch.randint(4, 97, (n,)) for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = p
        attention_mask[i, width - len(p) :] = 1
    new = 8
    with torch.no_grad():
        batched = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD
        )
        for i, p in enumerate(prompts):
            single = model.generate(
                p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=new,
                do_sample=False, pad_token_id=PAD,
            )[0, len(p) :]  # fmt: skip
            # a sequence that hit EOS early is padded in the batch
            got = batched[i, width:]
            assert got[: len(single)].tolist() == single.tolist(), i
            assert (got[len(single) :] == PAD).all(), i


def test_output_expert_load_counts_every_routed_token():
    cfg = tiny_config()
    model = DeepSeekForCausalLM(cfg).eval()
    batch, length = 3, 10
    out = model(torch.randint(0, 97, (batch, length)), output_expert_load=True)
    num_moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert out.expert_load.shape == (num_moe_layers, cfg.n_routed_experts)
    assert not out.expert_load.is_floating_point()
    assert (out.expert_load >= 0).all()
    assert out.expert_load.sum(dim=1).tolist() == [batch * length * cfg.num_experts_per_tok] * num_moe_layers
    assert model(torch.randint(0, 97, (1, 4))).expert_load is None


def test_aux_loss_is_positive_and_part_of_the_loss():
    cfg = tiny_config(aux_loss_alpha=0.01, mtp_loss_weight=0.3)
    model = DeepSeekForCausalLM(cfg).train()
    input_ids = torch.randint(0, 97, (2, 12))
    out = model(input_ids, labels=input_ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, main + 0.3 * out.mtp_loss + out.aux_loss)
    out.loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0

    # the balance loss only trains: none in eval mode, none with alpha = 0
    model.eval()
    assert model(input_ids, labels=input_ids).aux_loss is None
    assert DeepSeekForCausalLM(tiny_config()).train()(input_ids, labels=input_ids).aux_loss is None
