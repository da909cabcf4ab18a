"""Data for training and evaluating the small models: the character-level tokenizer and
synthetic verifiable tasks (addition, Countdown) with disjoint train/test splits.
"""

from hf_deepseek.data.tasks import addition_examples, countdown_examples, split_of, verify_countdown
from hf_deepseek.data.tokenizer import build_tokenizer

__all__ = ["addition_examples", "build_tokenizer", "countdown_examples", "split_of", "verify_countdown"]
