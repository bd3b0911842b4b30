"""The PPO run config (nemo_aligner/conf/gpt_ppo.yaml): `PPOConfig` is model.ppo's loss and advantage
settings (KL penalty, GAE, whitening, clipped policy and value losses) with TRL `PPOConfig`'s names and
defaults and NeMo-Aligner's switches; `PPOSection` adds NeMo-Aligner's rollout keys (num_rollout_samples,
micro-batch sizes, ratio_eps, length_params, sampling_params); `PPORunConfig` is the whole run: trainer.ppo,
the prompt data, reward_model.restore_from_path and critic.restore_from_path.

Where NeMo-Aligner and TRL name the same setting, both are accepted and the NeMo key wins when set:
trainer.ppo.initial_policy_kl_penalty = model.ppo.kl_coef, model.ppo.ratio_eps = cliprange,
model.ppo.sampling_params.temperature = temperature. model.global_batch_size is the mini-batch of one
optimiser step (NeMo's meaning); num_rollout_samples = global_batch_size x num_mini_batches.

The choice list mirrors `losses.ppo.KL_ESTIMATORS` (this package must not import torch;
tests/test_ppo_losses.py keeps them equal). What each setting computes: docs/rl_losses.md.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_aligner.config.grpo import GRPODataConfig
from nemo_aligner.config.sections import (
    CheckpointParams, ExpManagerConfig, LoopConfig, ModelConfig, OptimConfig, RunConfig, SchedConfig,
    TrainerConfig, _choice,
)

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


# ------------------------------------------------------------------------------------------------------------
# The PPO run config (nemo_aligner/conf/gpt_ppo.yaml)
# ------------------------------------------------------------------------------------------------------------


@dataclass
class PPOLengthParams:
    """model.ppo.length_params (NeMo-Aligner's)."""

    max_length: Optional[int] = None  # max tokens generated per completion; null = half the sequence length (NeMo's)


@dataclass
class PPOSamplingParams:
    """model.ppo.sampling_params (NeMo-Aligner's keys)."""

    use_greedy: bool = False  # greedy rollouts (temperature 0); PPO needs sampling, so only for debugging
    temperature: Optional[float] = None  # NeMo's key; when set it is model.ppo.temperature (sampling and log-probs)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    end_strings: list = field(default_factory=list)  # stop strings (beside the tokenizer's / generation_config's EOS ids)


@dataclass
class PPOSection(PPOConfig):
    """model.ppo: TRL PPOConfig's loss settings (above) plus NeMo-Aligner's rollout keys."""

    # prompts (one completion each) generated per step; the step then trains num_ppo_epochs passes over them in
    # mini-batches of model.global_batch_size. null = model.global_batch_size x num_mini_batches (TRL)
    num_rollout_samples: Optional[int] = None
    rollout_micro_batch_size: int = 8  # completions the built-in sampler decodes together (per data-parallel rank)
    forward_micro_batch_size: int = 8  # completions per forward-only micro-batch (old / reference log-probs, values, scores)
    ratio_eps: Optional[float] = None  # NeMo's name of cliprange; when set it is the clip range
    num_val_samples: Optional[int] = None  # validation prompts per validation (val/scores); null = all
    logprob_chunk_size: int = 1024  # tokens per chunk of the output projection (memory vs speed)
    # memory on an accelerator (no-ops on CPU): the optimiser's state on the CPU during each rollout (NeMo's key)
    offload_adam_states: bool = False
    offload_reference: bool = False  # the frozen reference policy on the CPU except during its pass
    offload_reward_model: bool = False  # the reward model on the CPU except while it scores
    length_params: PPOLengthParams = field(default_factory=PPOLengthParams)
    sampling_params: PPOSamplingParams = field(default_factory=PPOSamplingParams)

    def __post_init__(self):
        if self.ratio_eps is not None:
            self.cliprange = self.ratio_eps
        if self.sampling_params.temperature is not None:
            self.temperature = self.sampling_params.temperature
        if self.sampling_params.use_greedy:
            raise ValueError("model.ppo.sampling_params.use_greedy=true: PPO's ratios need sampled rollouts at "
                             "model.ppo.temperature > 0; set use_greedy=false")
        super().__post_init__()
        for key in ("rollout_micro_batch_size", "forward_micro_batch_size", "logprob_chunk_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.ppo.{key}={value!r}; expected an integer >= 1")
        for key, value in (("num_rollout_samples", self.num_rollout_samples), ("num_val_samples", self.num_val_samples),
                           ("length_params.max_length", self.length_params.max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"model.ppo.{key}={value!r}; expected an integer >= 1 or null")
        s = self.sampling_params
        if s.top_k < 0 or not 0 < s.top_p <= 1:
            raise ValueError(f"model.ppo.sampling_params: top_k={s.top_k}, top_p={s.top_p}; expected top_k >= 0 and "
                             "0 < top_p <= 1")
        if any(not isinstance(x, str) or not x for x in s.end_strings):
            raise ValueError(f"model.ppo.sampling_params.end_strings={s.end_strings!r}; expected non-empty strings")

    def rollout_batches(self, global_batch_size: int) -> tuple[int, int]:
        """(num_rollout_samples, num_mini_batches) consistent with model.global_batch_size (the mini-batch of
        one optimiser step, NeMo's meaning): whichever of the two is not set is derived from the other."""
        if self.num_rollout_samples is None:
            return global_batch_size * self.num_mini_batches, self.num_mini_batches
        if self.num_rollout_samples % global_batch_size:
            raise ValueError(f"model.ppo.num_rollout_samples={self.num_rollout_samples} is not a multiple of "
                             f"model.global_batch_size={global_batch_size} (the mini-batch of one optimiser step)")
        derived = self.num_rollout_samples // global_batch_size
        if self.num_mini_batches not in (1, derived):
            raise ValueError(f"model.ppo.num_mini_batches={self.num_mini_batches} but model.ppo.num_rollout_samples / "
                             f"model.global_batch_size = {derived}; set one of them (the other is derived)")
        return self.num_rollout_samples, derived


@dataclass
class PPOLoopConfig(LoopConfig):
    """trainer.ppo: NeMo-Aligner's gpt_ppo_actor.yaml cadence. A step is one rollout batch and its
    num_ppo_epochs x num_mini_batches optimiser steps (NeMo's and TRL's "update")."""

    val_check_interval: Any = 10  # int = every N steps, float = fraction of an epoch (and always at the end)
    save_interval: int = 10  # checkpoint every N steps (0 = only at the end)
    initial_policy_kl_penalty: Optional[float] = None  # NeMo's name of model.ppo.kl_coef; when set it is the KL coefficient


@dataclass
class PPOTrainerConfig(TrainerConfig):
    ppo: PPOLoopConfig = field(default_factory=PPOLoopConfig)


def _ppo_optim() -> OptimConfig:
    """TRL PPOConfig: one AdamW over actor and critic, lr 3e-6, no weight decay, linear decay."""
    return OptimConfig(lr=3e-6, weight_decay=0.0, betas=[0.9, 0.999],
                       sched=SchedConfig(name="linear", warmup_steps=0, constant_steps=0, min_lr=0.0))


@dataclass
class PPOModelConfig(ModelConfig):
    optim: OptimConfig = field(default_factory=_ppo_optim)
    # prompt files exactly as GRPO reads them (model.data.prompt_key; max prompt length: seq_length - max_length)
    data: GRPODataConfig = field(default_factory=GRPODataConfig)
    ppo: PPOSection = field(default_factory=PPOSection)

    def __post_init__(self):
        super().__post_init__()
        self.ppo.rollout_batches(self.global_batch_size)  # checked here, derived where used


@dataclass
class RewardModelSection:
    """reward_model: the frozen reward model (ours, or any Hugging Face *ForSequenceClassification folder)."""

    restore_from_path: Optional[str] = None  # its folder (required); NeMo-Aligner served it from a separate job


@dataclass
class CriticSection:
    """critic: the value model, a *ForSequenceClassification (or causal-LM: fresh head) folder."""

    restore_from_path: Optional[str] = None  # null = reward_model.restore_from_path (NeMo-Aligner's and TRL's default)


def _ppo_exp_manager() -> ExpManagerConfig:  # the best checkpoints: the highest mean validation score
    return ExpManagerConfig(checkpoint_callback_params=CheckpointParams(monitor="val_objective/scores", mode="max"))


@dataclass
class PPORunConfig(RunConfig):
    """The whole of gpt_ppo.yaml."""

    name: str = "megatron_gpt_ppo"  # the run's name (NeMo's)
    trainer: PPOTrainerConfig = field(default_factory=PPOTrainerConfig)
    model: PPOModelConfig = field(default_factory=PPOModelConfig)
    reward_model: RewardModelSection = field(default_factory=RewardModelSection)
    critic: CriticSection = field(default_factory=CriticSection)
    exp_manager: ExpManagerConfig = field(default_factory=_ppo_exp_manager)

    def __post_init__(self):
        kl = self.trainer.ppo.initial_policy_kl_penalty
        if kl is not None:
            if kl < 0:
                raise ValueError(f"trainer.ppo.initial_policy_kl_penalty={kl}; expected >= 0")
            self.model.ppo.kl_coef = kl

    def check_reward_model(self) -> None:
        """The one key a PPO run cannot default (checked when the run starts)."""
        if not self.reward_model.restore_from_path:
            raise ValueError("reward_model.restore_from_path is not set; expected the reward model's folder (the hf/ "
                             "of train_reward_model.py, or any *ForSequenceClassification checkpoint)")

    @property
    def critic_path(self) -> str:
        return self.critic.restore_from_path or self.reward_model.restore_from_path
