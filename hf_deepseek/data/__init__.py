"""Data for training and evaluating the small models: the character-level tokenizer, synthetic verifiable tasks
(addition, Countdown) with disjoint train/test splits, reasoning-gym training problems, and the R1 template
(prompts, GRPO rows, cold-start SFT rows with worked solutions).
"""

from hf_deepseek.data.expressions import ExpressionError, parse_expression
from hf_deepseek.data.r1 import INSTRUCTION, R1_SYSTEM_PROMPT, cold_start_completion, grpo_row, sft_row
from hf_deepseek.data.reasoning_tasks import TASKS, task_examples
from hf_deepseek.data.tasks import addition_examples, countdown_examples, split_of, verify_countdown
from hf_deepseek.data.tokenizer import build_tokenizer

__all__ = [
    "INSTRUCTION",
    "R1_SYSTEM_PROMPT",
    "TASKS",
    "ExpressionError",
    "addition_examples",
    "build_tokenizer",
    "cold_start_completion",
    "countdown_examples",
    "grpo_row",
    "parse_expression",
    "sft_row",
    "split_of",
    "task_examples",
    "verify_countdown",
]
