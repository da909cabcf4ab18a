"""hf-deepseek: DeepSeek-V3 / R1 for the Hugging Face stack.

Importing the package registers `DeepSeekConfig` (`model_type = "hf_deepseek"`) and its models with
transformers' Auto classes, and the official checkpoint layout with transformers' loader. The `hf-deepseek`
command is the one exception: it registers when a subcommand runs (`register_auto_classes`), so that
`hf-deepseek --help` does not import torch and transformers.
"""

import sys
from pathlib import Path

__version__ = "0.1.0"
__all__ = [
    "DeepSeekCausalLMOutput",
    "DeepSeekConfig",
    "DeepSeekForCausalLM",
    "DeepSeekModel",
    "DeepSeekPreTrainedModel",
    "register_auto_classes",
]


def register_auto_classes() -> None:
    """Register the config and models with transformers' Auto classes and loader (safe to call again)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration import DeepSeekConfig
    from .modeling import DeepSeekCausalLMOutput, DeepSeekForCausalLM, DeepSeekModel, DeepSeekPreTrainedModel
    from .modeling.checkpoint import register_checkpoint_layout

    AutoConfig.register(DeepSeekConfig.model_type, DeepSeekConfig, exist_ok=True)
    AutoModel.register(DeepSeekConfig, DeepSeekModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepSeekConfig, DeepSeekForCausalLM, exist_ok=True)
    register_checkpoint_layout()
    globals().update(
        DeepSeekCausalLMOutput=DeepSeekCausalLMOutput,
        DeepSeekConfig=DeepSeekConfig,
        DeepSeekForCausalLM=DeepSeekForCausalLM,
        DeepSeekModel=DeepSeekModel,
        DeepSeekPreTrainedModel=DeepSeekPreTrainedModel,
    )


def _started_as_command() -> bool:
    """Whether this process is the `hf-deepseek` command (the console script or `python -m hf_deepseek.cli`)."""
    argv = getattr(sys, "orig_argv", [])
    as_module = any(a == "-m" and b == "hf_deepseek.cli" for a, b in zip(argv, argv[1:], strict=False))
    return as_module or Path(sys.argv[0] if sys.argv else "").stem == "hf-deepseek"


def __getattr__(name: str):
    if name in __all__:
        register_auto_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _started_as_command():
    register_auto_classes()
