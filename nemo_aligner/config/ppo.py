"""model.ppo: the settings section of PPO's loss and advantages (KL penalty, GAE, whitening, clipped
policy and value losses), with TRL `PPOConfig`'s names and defaults and NeMo-Aligner's switches. A
settings section only: the run config (trainer.ppo, critic, rollouts) comes with the PPO recipe.

The choice list mirrors `losses.ppo.KL_ESTIMATORS` (this package must not import torch;
tests/test_ppo_losses.py keeps them equal). What each setting computes: docs/rl_losses.md.
"""

from dataclasses import dataclass
from typing import Optional

from nemo_aligner.config.sections import _choice

KL_ESTIMATORS = ("k1", "k3")


@dataclass
class PPOConfig:
    """model.ppo: KL penalty, GAE, whitening and the clipped losses."""

    num_ppo_epochs: int = 4  # optimisation passes over each rollout batch
    num_mini_batches: int = 1  # optimiser steps per pass (the rollout batch split into this many)
    kl_coef: float = 0.05  # per-token KL penalty folded into the rewards: r_t = -kl_coef * KL_t (+ score on the last token)
    kl_estimator: str = "k1"  # k1 = logp - ref_logp (unbiased) | k3 = exp(ref - logp) - 1 - (ref - logp) (>= 0, lower variance)
    use_absolute_kl: bool = False  # |k1| instead of k1 (NeMo-Aligner's use_absolute_kl)
    missing_eos_penalty: Optional[float] = None  # subtracted from the score of a completion without EOS; null = off
    whiten_rewards: bool = False  # whiten the per-token rewards over the batch (spread only) before GAE
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # whiten advantages over the batch's tokens (TRL always does; NeMo's normalize_advantage)
    cliprange: float = 0.2  # policy ratio clipped to [1 - cliprange, 1 + cliprange]
    cliprange_value: float = 0.2  # value prediction clipped to old value +- cliprange_value
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    entropy_bonus: float = 0.0  # weight of the mean token entropy subtracted from the loss (NeMo-Aligner's key)
    temperature: float = 0.7  # sampling temperature; the policy's log-probs use logits / temperature too

    def __post_init__(self):
        _choice("model.ppo.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.use_absolute_kl and self.kl_estimator == "k3":
            raise ValueError("model.ppo.use_absolute_kl=True with model.ppo.kl_estimator=k3: k3 is never negative, "
                             "so the absolute value changes nothing; use kl_estimator=k1 or use_absolute_kl=False")
        for key in ("num_ppo_epochs", "num_mini_batches"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.ppo.{key}={value!r}; expected an integer >= 1")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"model.ppo.{key}={getattr(self, key)}; expected in [0, 1]")
        for key in ("kl_coef", "cliprange", "cliprange_value", "vf_coef", "entropy_bonus"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"model.ppo.{key}={getattr(self, key)}; expected >= 0")
        if not self.cliprange < 1:
            raise ValueError(f"model.ppo.cliprange={self.cliprange}; expected < 1 (the ratio is clipped at 1 - cliprange)")
        if not self.temperature > 0:
            raise ValueError(f"model.ppo.temperature={self.temperature}; expected > 0")
