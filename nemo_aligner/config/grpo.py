"""The GRPO run config (examples/nlp/gpt/conf/gpt_grpo.yaml): the shared sections plus trainer.grpo, the
prompt data section model.data and model.grpo (rollouts, rewards, advantages, the loss), with TRL
`GRPOConfig` 1.16's names and defaults where NeMo has none.

`model.global_batch_size` counts completions (as TRL and NeMo-RL): each step draws
global_batch_size / num_generations prompts and samples num_generations completions of each;
`model.micro_batch_size` counts completions too. Optimiser defaults are TRL's GRPOConfig: lr 1e-6, no weight
decay, betas (0.9, 0.999), gradient clipping 1.0; a constant schedule (NeMo-RL's GRPO default).

The choice lists here mirror the registries in `losses.policy` (this package must not import torch;
tests/test_policy_losses.py keeps them equal). What each loss type and estimator computes:
docs/rl_losses.md.
"""

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from nemo_aligner.config.sections import (
    CheckpointParams, DataConfig, ExpManagerConfig, LoopConfig, ModelConfig, OptimConfig, RunConfig, SchedConfig,
    TrainerConfig, _choice,
)

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# what scale_rewards: null means for each estimator (its reference implementation's behaviour)
DEFAULT_SCALE_REWARDS = {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "none"}
REWARD_SPEC_KEYS = ("fn", "name", "kwargs")
ENGINES = ("builtin", "vllm")


@dataclass
class GRPOConfig:
    """model.grpo: rollouts, rewards, advantages and the GRPO-family loss."""

    num_generations: int = 8  # completions sampled per prompt (the group size G)
    max_prompt_length: int = 512  # prompt tokens at most
    max_completion_length: int = 512  # new tokens at most per completion (also dr_grpo's constant)
    temperature: float = 1.0  # sampling temperature; the policy's log-probs use logits / temperature too
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = 0  # top-k sampling; 0 = off
    reward_funcs: List[Any] = field(default_factory=list)  # specs: 'path/file.py:fn', 'package.module:fn', a built-in name, or {fn: <spec>, name: <metric name>, kwargs: {...}}
    reward_weights: Optional[List[float]] = None  # one per reward (reward_funcs, then the reward model); null = all 1.0
    reward_model_path: Optional[str] = None  # a Hugging Face *ForSequenceClassification folder, scored as one more reward
    advantage_estimator: str = "grpo"  # grpo (group mean) | rloo (leave-one-out mean) | reinforce_plus_plus (group mean, then whitened over the batch's tokens)
    scale_rewards: Optional[str] = None  # group | batch | none: divide advantages by the group's / batch's reward std; null = group for grpo, none otherwise
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo: how token losses are aggregated (docs/rl_losses.md)
    epsilon: float = 0.2  # lower clip: the ratio is clipped at 1 - epsilon
    epsilon_high: Optional[float] = None  # upper clip at 1 + epsilon_high; null = epsilon (DAPO uses 0.28)
    delta: Optional[float] = None  # two-sided clipping (INTELLECT-2): cap on the unclipped ratio, > 1 (best > 1 + epsilon_high); null = off
    importance_sampling_level: str = "token"  # token | sequence (GSPO: one length-normalised ratio per completion)
    beta: float = 0.0  # KL-to-reference coefficient (k3 estimator); 0 = no reference pass at all (with LoRA the reference is adapters-off)
    use_bias_correction_kl: bool = True  # multiply the k3 KL by the importance ratio (TRL 1.16's default)
    num_iterations: int = 1  # optimiser passes over each rollout batch (mu); > 1 needs the rollout's log-probs
    mask_truncated_completions: bool = False  # completions cut at max_completion_length (no EOS) get no loss (DAPO)
    engine: str = "builtin"  # builtin (the KV-cache sampler on the live policy) | vllm (colocated; needs vllm installed)
    generation_batch_size: int = 64  # completions the built-in sampler decodes together
    logprob_chunk_size: int = 1024  # tokens per chunk of the output projection (memory vs speed)
    log_rollouts: bool = False  # write every step's prompts, completions and rewards to <log_dir>/rollouts.jsonl
    val_num_generations: int = 1  # completions per validation prompt (val/reward is their mean reward)

    def __post_init__(self):
        _choice("model.grpo.engine", self.engine, ENGINES)
        for key in ("generation_batch_size", "logprob_chunk_size", "val_num_generations"):
            _positive_int(f"model.grpo.{key}", getattr(self, key))
        _choice("model.grpo.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _choice("model.grpo.scale_rewards", self.scale_rewards, (None,) + SCALE_REWARDS)
        _choice("model.grpo.loss_type", self.loss_type, GRPO_LOSS_TYPES)
        _choice("model.grpo.importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        if self.advantage_estimator == "reinforce_plus_plus" and self.scale_rewards not in (None, "none"):
            raise ValueError(f"model.grpo.scale_rewards={self.scale_rewards!r} with model.grpo.advantage_estimator="
                             "reinforce_plus_plus; expected none or null (REINFORCE++ whitens over the batch itself)")
        _positive_int("model.grpo.num_generations", self.num_generations, minimum=2,
                      why=" (a group needs two completions to have a baseline)")
        for key in ("max_prompt_length", "max_completion_length", "num_iterations"):
            _positive_int(f"model.grpo.{key}", getattr(self, key))
        self._check_sampling()
        self._check_clipping()
        if not self.beta >= 0:
            raise ValueError(f"model.grpo.beta={self.beta}; expected >= 0 (0 = no KL term, no reference pass)")
        self._check_rewards()

    def _check_sampling(self):
        if not self.temperature > 0:
            raise ValueError(f"model.grpo.temperature={self.temperature}; expected > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"model.grpo.top_p={self.top_p}; expected in (0, 1] (1.0 = off)")
        if self.top_k < 0:
            raise ValueError(f"model.grpo.top_k={self.top_k}; expected >= 0 (0 = off)")

    def _check_clipping(self):
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"model.grpo.epsilon={self.epsilon}; expected in [0, 1)")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:
            raise ValueError(f"model.grpo.epsilon_high={self.epsilon_high}; expected >= 0 or null (= epsilon)")
        if self.delta is not None and not self.delta > 1:
            raise ValueError(f"model.grpo.delta={self.delta}; expected > 1 (best > 1 + epsilon_high = "
                             f"{1 + self.resolved_epsilon_high}) or null: a cap at or below 1 caps an unchanged policy")

    def _check_rewards(self):
        for i, spec in enumerate(self.reward_funcs):
            _check_reward_spec(f"model.grpo.reward_funcs[{i}]", spec)
        if self.reward_weights is not None:
            expected = self.num_rewards
            if len(self.reward_weights) != expected:
                raise ValueError(f"model.grpo.reward_weights has {len(self.reward_weights)} entries, expected "
                                 f"{expected} (one per model.grpo.reward_funcs entry"
                                 f"{', then one for model.grpo.reward_model_path' if self.reward_model_path else ''})")
            bad = [w for w in self.reward_weights if not math.isfinite(w)]
            if bad:
                raise ValueError(f"model.grpo.reward_weights={list(self.reward_weights)}; expected finite numbers")

    @property
    def num_rewards(self) -> int:
        """Reward functions plus the reward model, if any."""
        return len(self.reward_funcs) + (1 if self.reward_model_path else 0)

    @property
    def resolved_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def resolved_scale_rewards(self) -> str:
        """model.grpo.scale_rewards with null resolved for the advantage estimator."""
        return self.scale_rewards or DEFAULT_SCALE_REWARDS[self.advantage_estimator]


@dataclass
class GRPODataConfig(DataConfig):
    """model.data for GRPO: prompt files (jsonl / parquet), the prompt column, the chat template; every other
    column of a row is handed to the reward functions. Prompts longer than model.grpo.max_prompt_length
    follow model.data.overlength (truncate keeps their last tokens, as TRL)."""

    prompt_key: str = "prompt"  # the column holding the prompt: a string (verbatim) or a list of {role, content}
    # packing: each micro-batch's completions packed into rows of pack_size tokens (null = the micro-batch's
    # longest); padded otherwise

    def __post_init__(self):
        super().__post_init__()
        _choice("model.data.data_impl", self.data_impl, ("jsonl", "parquet"))


def _grpo_loop() -> LoopConfig:
    return LoopConfig(val_check_interval=10, save_interval=50)  # NeMo-RL's GRPO validates every 10 steps


def _grpo_optim() -> OptimConfig:  # TRL GRPOConfig: lr 1e-6, AdamW without weight decay; constant lr (NeMo-RL)
    return OptimConfig(lr=1e-6, weight_decay=0.0, betas=[0.9, 0.999],
                       sched=SchedConfig(name="constant", warmup_steps=0, constant_steps=0, min_lr=0.0))


def _grpo_exp_manager() -> ExpManagerConfig:  # the best checkpoints are those with the highest val/reward
    return ExpManagerConfig(checkpoint_callback_params=CheckpointParams(monitor="val_reward", mode="max"))


@dataclass
class GRPOTrainerConfig(TrainerConfig):
    grpo: LoopConfig = field(default_factory=_grpo_loop)


@dataclass
class GRPOModelConfig(ModelConfig):
    optim: OptimConfig = field(default_factory=_grpo_optim)
    data: GRPODataConfig = field(default_factory=GRPODataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def __post_init__(self):
        super().__post_init__()
        G = self.grpo.num_generations
        if self.global_batch_size % G:
            raise ValueError(f"model.global_batch_size={self.global_batch_size} counts completions and must be a "
                             f"multiple of model.grpo.num_generations={G} (each prompt's group is whole)")


@dataclass
class GRPORunConfig(RunConfig):
    """The whole of gpt_grpo.yaml."""

    name: str = "megatron_gpt_grpo"
    trainer: GRPOTrainerConfig = field(default_factory=GRPOTrainerConfig)
    model: GRPOModelConfig = field(default_factory=GRPOModelConfig)
    exp_manager: ExpManagerConfig = field(default_factory=_grpo_exp_manager)


def _positive_int(key: str, value: int, minimum: int = 1, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}; expected an integer >= {minimum}{why}")


def _check_reward_spec(key: str, spec: Any) -> None:
    """Shape only (the file or module is loaded by nemo_aligner.rewards, which names the key again)."""
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"{key} is empty; expected 'path/file.py:function', 'package.module:function' or a "
                             "built-in name")
        return
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(REWARD_SPEC_KEYS))
        if unknown or not isinstance(spec.get("fn"), str):
            raise ValueError(f"{key}={spec!r}; expected a string spec or {{fn: <spec>, name: <metric name>, "
                             f"kwargs: {{...}}}} (fn required" + (f"; unknown keys {unknown})" if unknown else ")"))
        if spec.get("kwargs") is not None and not isinstance(spec["kwargs"], dict):
            raise ValueError(f"{key}.kwargs={spec['kwargs']!r}; expected a mapping of keyword arguments")
        return
    raise ValueError(f"{key}={spec!r}; expected a string spec or a mapping {{fn, name, kwargs}}")
