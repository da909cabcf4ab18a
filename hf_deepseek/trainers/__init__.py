"""TRL-based training the DeepSeek way: `DeepSeekSFTTrainer` and `DeepSeekGRPOTrainer` (with their configs) train
the model's MTP and balance losses and run aux-loss-free balancing (`balancing`); `rewards` holds the rule-based
rewards, `recipes` the YAML recipes behind `hf-deepseek train`, `plotting` the metric curves.

The trainer classes import TRL; they are loaded on first use, so `balancing` and `rewards` work without it.
"""

_LAZY = {
    "DeepSeekSFTConfig": "hf_deepseek.trainers.sft",
    "DeepSeekSFTTrainer": "hf_deepseek.trainers.sft",
    "DeepSeekGRPOConfig": "hf_deepseek.trainers.grpo",
    "DeepSeekGRPOTrainer": "hf_deepseek.trainers.grpo",
    "RouterBiasBalancer": "hf_deepseek.trainers.balancing",
    "get_reward_funcs": "hf_deepseek.trainers.rewards",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
