"""Rewards for online RL (GRPO family): built-in reward functions, loading `model.grpo.reward_funcs`
specs (`path/to/file.py:fn`, `package.module:fn`, built-in names), and `RewardFunctions`, which calls
them on a batch, checks what they return and combines them with `model.grpo.reward_weights`.

Built-ins (usable as `accuracy_last_number` or `nemo_aligner.rewards:accuracy_last_number`):
accuracy_last_number, accuracy_boxed, accuracy_regex, math_equivalence (needs math-verify),
format_reward, length_penalty. Details in docs/rl_losses.md.
"""

from nemo_aligner.rewards.builtin import (
    BUILTINS,
    accuracy_boxed,
    accuracy_last_number,
    accuracy_regex,
    format_reward,
    length_penalty,
    math_equivalence,
)
from nemo_aligner.rewards.combine import RewardError, RewardFunctions, RewardScores
from nemo_aligner.rewards.loading import RewardFunction, load_reward_function, load_reward_functions

__all__ = ["BUILTINS", "RewardError", "RewardFunction", "RewardFunctions", "RewardScores", "accuracy_boxed",
           "accuracy_last_number", "accuracy_regex", "format_reward", "length_penalty", "load_reward_function",
           "load_reward_functions", "math_equivalence"]
