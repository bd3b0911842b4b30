"""Training objectives as pure tensor functions: preference losses (DPO family, SimPO, ORPO), the GRPO
family (policy losses, group advantages; `losses.policy`) and PPO (GAE, clipped losses, KL estimators,
whitening; `losses.ppo`), each with its metrics."""

from nemo_aligner.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSS_TYPES,
    PolicyLossOutput,
    chunked_entropy,
    completion_metrics,
    group_advantages,
    mask_truncated,
    policy_loss,
    policy_loss_and_metrics,
    reduce_policy_metrics,
    reward_metrics,
    token_logprobs_and_entropy,
    token_logprobs_at_temperature,
)
from nemo_aligner.losses.ppo import (
    KL_ESTIMATORS,
    PPOLossOutput,
    apply_missing_eos_penalty,
    gae,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
    reduce_ppo_metrics,
    token_rewards,
    whiten_advantages,
    whiten_rewards,
)
from nemo_aligner.losses.preference import (
    LOSS_TYPES,
    REFERENCE_FREE_LOSSES,
    combined_preference_loss,
    preference_loss,
    preference_metrics,
    sft_loss_from_logps,
)

__all__ = ["LOSS_TYPES", "REFERENCE_FREE_LOSSES", "combined_preference_loss", "preference_loss",
           "preference_metrics", "sft_loss_from_logps",
           # GRPO family
           "ADVANTAGE_ESTIMATORS", "POLICY_LOSS_TYPES", "PolicyLossOutput", "chunked_entropy", "completion_metrics",
           "group_advantages", "mask_truncated", "policy_loss", "policy_loss_and_metrics", "reduce_policy_metrics",
           "reward_metrics", "token_logprobs_and_entropy", "token_logprobs_at_temperature",
           # PPO
           "KL_ESTIMATORS", "PPOLossOutput", "apply_missing_eos_penalty", "gae", "kl_estimate", "masked_mean",
           "masked_var", "masked_whiten", "ppo_loss", "reduce_ppo_metrics", "token_rewards", "whiten_advantages",
           "whiten_rewards"]
