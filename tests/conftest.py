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

from hf_deepseek.evals.bench import TINY_CONFIG  # noqa: E402  (after the offline settings above)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# the benchmark's tiny shapes with a third layer (two MoE layers), a vocabulary not a power of 2, a shorter RoPE table
TINY_CONFIG_DEFAULTS = TINY_CONFIG | dict(vocab_size=97, num_hidden_layers=3, max_position_embeddings=256)


def tiny_config(**overrides):
    """A DeepSeekConfig small enough for CPU tests; keyword arguments override the defaults.

    Import it (`from conftest import tiny_config`) or request the `tiny_config` fixture, which returns this
    function.
    """
    from hf_deepseek import DeepSeekConfig

    return DeepSeekConfig(**{**TINY_CONFIG_DEFAULTS, **overrides})


def graph_recorder():
    """(backend, graphs): a torch.compile backend that appends each FX graph Dynamo hands it to `graphs` and runs it
    eagerly, for tests that look at what a compiled call traced."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
