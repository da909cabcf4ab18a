"""Shared pytest setup: keep every test offline and skip `gpu`-marked tests when CUDA is absent."""

import os

import pytest
import torch

for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)

# Tiny test models gain nothing from intra-op threads, and on a busy 2-core runner OpenMP's spinning threads
# make a training step ~100x slower (measured: 26 ms with 1 thread, 3.2 s with 2 beside another busy process).
# HF_DEEPSEEK_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("HF_DEEPSEEK_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_CONFIG_DEFAULTS = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    first_k_dense_replace=1,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
)


def tiny_config(**overrides):
    """A DeepSeekConfig small enough for CPU tests; keyword arguments override the defaults.

    Import it (`from conftest import tiny_config`) or request the `tiny_config` fixture, which returns this
    function.
    """
    from hf_deepseek import DeepSeekConfig

    return DeepSeekConfig(**{**TINY_CONFIG_DEFAULTS, **overrides})


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
