"""GRPO and its variants (DAPO, Dr. GRPO, GSPO, BNPO; RLOO and REINFORCE++ advantages) as an online
algorithm (training.protocol.Online): each step generates num_generations completions of each of its
prompts, scores them with the reward functions, turns rewards into group advantages over the whole
(data-parallel) batch, runs the reference pass when beta > 0, and trains num_iterations passes on the
rollout with `losses.policy.policy_loss_and_metrics`.

Old log-probs: with num_iterations = 1 they are the current log-probs detached (ratio 1, TRL's shortcut);
with more passes the first pass (run by the unchanged rollout policy) records its log-probs for the next
ones, so no extra forward is needed. All log-probs (policy, old, reference) are taken at the sampling
temperature, as TRL's.

Metrics (TRL's names, logged under train/): reward, reward_std, rewards/<name>/mean|std,
frac_reward_zero_std, kl (beta > 0), clip_ratio/low_mean|high_mean|region_mean, completions/mean_length
|min_length|max_length|clipped_ratio, entropy, loss; time/<phase> and tokens_per_sec/<phase> for
generation, rewards, reference and policy. Validation: val/reward (and val/rewards/<name>/mean).

Shapes: B completions of the global batch, S completions of a micro-batch, L completion tokens.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_aligner.generation.params import SamplingParams
from nemo_aligner.losses.policy import (
    PolicyHead, completion_metrics, group_advantages, mask_truncated, num_units, policy_loss_and_metrics,
    policy_loss_count_key, policy_loss_unit, reduce_policy_metrics, reward_metrics,
)
from nemo_aligner.rewards.combine import RewardError, RewardScores
from nemo_aligner.rollout import (
    VALIDATION_STREAM, PhaseTimes, Rollout, RolloutBatch, collate_rollout, gather_objects, gather_over_dp,
    generate_rollouts, per_sequence, rank_share, step_seed,
)

log = logging.getLogger("nemo_aligner")


@dataclass
class GRPOSettings:
    """model.grpo as the algorithm uses it (the loss part of a run's identity)."""

    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int
    advantage_estimator: str
    scale_rewards: str
    loss_type: str
    epsilon: float
    epsilon_high: float
    delta: Optional[float]
    importance_sampling_level: str
    beta: float
    use_bias_correction_kl: bool
    num_iterations: int
    mask_truncated_completions: bool
    reward_funcs: list = field(default_factory=list)
    reward_weights: Optional[list] = None
    val_num_generations: int = 1
    chunk_size: int = 1024

    @classmethod
    def from_config(cls, g) -> "GRPOSettings":
        return cls(num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                   temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, advantage_estimator=g.advantage_estimator,
                   scale_rewards=g.resolved_scale_rewards, loss_type=g.loss_type, epsilon=g.epsilon,
                   epsilon_high=g.resolved_epsilon_high, delta=g.delta,
                   importance_sampling_level=g.importance_sampling_level, beta=g.beta,
                   use_bias_correction_kl=g.use_bias_correction_kl, num_iterations=g.num_iterations,
                   mask_truncated_completions=g.mask_truncated_completions, reward_funcs=list(g.reward_funcs),
                   reward_weights=None if g.reward_weights is None else list(g.reward_weights),
                   val_num_generations=g.val_num_generations, chunk_size=g.logprob_chunk_size)

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0

    def sampling(self, seed: int, num_samples: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, num_samples=num_samples, seed=seed)


def reward_inputs(dataset) -> tuple[list, list, list, dict]:
    """(prompts, completions, completion_ids, columns) as TRL hands them to reward functions: a message
    prompt's completion is [{role: assistant, content}], a string prompt's the text; columns are the union
    of the rows' other columns (None where a row lacks one)."""
    examples = dataset.examples
    prompts = [e.prompt for e in examples]
    completions = [[{"role": "assistant", "content": e.text}] if isinstance(e.prompt, list) else e.text
                   for e in examples]
    names = sorted({k for e in examples for k in e.columns})
    columns = {k: [e.columns.get(k) for e in examples] for k in names}
    return prompts, completions, [e.completion_ids.tolist() for e in examples], columns


class GRPOAlgorithm:
    """The algorithm protocol (training.protocol) and its Online part for the GRPO family. `engine` (a
    GenerationEngine) and `reference` (a rollout.RolloutReference, or None) are set by the recipe once the
    run object exists."""

    headline_metrics = ("reward", "loss")
    batch_unit = "completions"  # what model.global_batch_size / micro_batch_size count

    def __init__(self, settings: GRPOSettings, rewards, *, pad_id: int, global_batch_size: int, seed: int,
                 micro_batch_size: int, packed: bool = False, pack_size: int | None = None,
                 rollouts_file: Path | None = None, reward_model_weight: float = 1.0):
        """rewards: a RewardFunctions, or None (a reward model only); packed: each micro-batch's completions
        packed into rows of pack_size tokens (None = the micro-batch's longest); rollouts_file: a jsonl every
        step's completions are appended to; reward_model_weight: the weight of `reward_model` (set by the
        recipe once the run exists: a rewards.reward_model.RewardModel, scored as one more reward)."""
        self.settings, self.rewards, self.pad_id, self.seed = settings, rewards, pad_id, seed
        self.reward_model, self.reward_model_weight = None, reward_model_weight
        self.packed = packed
        self.items_per_step = global_batch_size // settings.num_generations  # prompts per step
        self.num_iterations = settings.num_iterations
        self.micro_batch_size, self.pack_size, self.rollouts_file = micro_batch_size, pack_size, rollouts_file
        self.engine = None
        self.reference = None

    # ------------------------------------------------------------------ the protocol
    @property
    def unit(self) -> str:
        return policy_loss_unit(self.settings.loss_type)

    def head(self) -> PolicyHead:
        return PolicyHead(self.settings.chunk_size, self.settings.temperature)

    def make_batch(self, dataset, items, packed: bool) -> RolloutBatch:
        """Rollout completions, padded or packed as model.data.packing says (the prompt layout's `packed`
        is about prompts, which are never packed)."""
        return collate_rollout(dataset, items, self.pad_id, self.packed, self.pack_size)

    def _mask(self, batch: RolloutBatch) -> torch.Tensor:
        _, mask_SL = per_sequence(batch.labels, batch)
        mask_SL = mask_SL.float()
        return mask_truncated(mask_SL, batch.truncated_S) if self.settings.mask_truncated_completions else mask_SL

    def num_units(self, batch: RolloutBatch) -> int:
        return int(num_units(self.settings.loss_type, self._mask(batch)))

    def loss(self, batch: RolloutBatch, outputs_RT2: torch.Tensor, num_units_global: int):
        s = self.settings
        values_SL2, _ = per_sequence(outputs_RT2, batch)
        logps_SL, entropy_SL = values_SL2[..., 0], values_SL2[..., 1]
        mask_SL = self._mask(batch)
        old_SL = batch.old_logps_SL if batch.old_logps_SL is not None else logps_SL.detach()
        if self.num_iterations > 1 and batch.old_logps_SL is None:  # first pass: the rollout policy itself
            batch.rollout.set_per_token("old_logps", batch.example_indices, logps_SL)
        out = policy_loss_and_metrics(
            s.loss_type, logps_SL, old_SL, batch.advantages_S.to(logps_SL.device), mask_SL,
            ref_logps_BT=batch.ref_logps_SL if s.needs_reference else None, beta=s.beta, epsilon=s.epsilon,
            epsilon_high=s.epsilon_high, delta=s.delta, importance_sampling_level=s.importance_sampling_level,
            use_bias_correction_kl=s.use_bias_correction_kl, max_completion_length=s.max_completion_length,
            entropy_BT=entropy_SL, **{policy_loss_count_key(s.loss_type): num_units_global})
        return out.loss, {**out.sums, "loss": out.loss.detach()}

    @staticmethod
    def reduce_metrics(sums: dict, num_units_global: int) -> dict[str, float]:
        """loss: the global batch's loss (the micro-batches' shares summed); TRL's clip / kl / entropy means."""
        return {"loss": float(sums["loss"]), **reduce_policy_metrics(sums)}

    @property
    def reward_names(self) -> list[str]:
        return (self.rewards.names if self.rewards is not None else []) + (
            ["reward_model"] if self.reward_model is not None else [])

    # ------------------------------------------------------------------ online
    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def rollout(self, prompts, items: list, step: int, run) -> Rollout:
        """This rank's completions of its share of the step's prompts, scored, with advantages over the whole
        batch and (beta > 0) reference log-probs."""
        s, dp, times = self.settings, run.dp, PhaseTimes()
        share, first = rank_share(items, dp)
        with times.phase("generation"):
            dataset = generate_rollouts(self.engine, prompts, share, first,
                                        s.sampling(step_seed(self.seed, step), s.num_generations))
        num_tokens_B = gather_over_dp(torch.tensor(dataset.values("num_labels"), dtype=torch.float64), dp)
        truncated_B = gather_over_dp(torch.tensor(dataset.values("truncated"), dtype=torch.float64), dp)
        times.add_tokens("generation", float(num_tokens_B.sum()))
        with times.phase("rewards"):
            local = self.score(dataset)
        scores = RewardScores(gather_over_dp(local.per_function_BF, dp), local.weights_F, local.names)
        rewards_B = scores.rewards_B
        advantages_B = group_advantages(rewards_B, s.num_generations, s.advantage_estimator, s.scale_rewards,
                                        num_tokens_B=num_tokens_B)
        n = len(dataset)
        for k, example in enumerate(dataset.examples):
            example.reward = float(rewards_B[dp.rank * n + k])
            example.advantage = float(advantages_B[dp.rank * n + k])
        if self.reference is not None:
            with times.phase("reference"):
                batches = self._micro_batches(dataset, run)
                self.reference.fill(dataset, batches, run.executor)
            tokens = dp.all_reduce_sum(torch.tensor([float(sum(b.num_real_tokens for b in batches))]))
            times.add_tokens("reference", float(tokens))
        metrics = {**reward_metrics(rewards_B, s.num_generations, s.scale_rewards), **scores.metrics(),
                   **completion_metrics(num_tokens_B, truncated_B.bool())}
        if self.rollouts_file is not None:
            self._log_rollouts(step, dataset, local, dp)
        return Rollout(dataset, metrics, times)

    def score(self, dataset) -> RewardScores:
        """The reward functions' scores of this rank's completions and, with a reward model, its score of
        each prompt + completion as one more column (named reward_model, weighted last)."""
        parts, weights, names = [], [], []
        if self.rewards is not None:  # a rank without completions (a short validation share) calls no function
            per_function_BF = (self.rewards(*reward_inputs(dataset)).per_function_BF if len(dataset)
                               else torch.zeros(0, len(self.rewards.names)))
            parts, weights, names = [per_function_BF], list(self.rewards.weights), list(self.rewards.names)
        if self.reward_model is not None:  # every rank, even without completions (its forwards are collective)
            examples = dataset.examples
            rm_B = self.reward_model.score([e.prompt_ids for e in examples], [e.completion_ids for e in examples])
            bad = (~torch.isfinite(rm_B)).nonzero().flatten().tolist()
            if bad:
                raise RewardError(f"the reward model (model.grpo.reward_model_path) scored sample {bad[0]} "
                                  f"{float(rm_B[bad[0]])}: prompt {examples[bad[0]].prompt!r:.200}, completion "
                                  f"{examples[bad[0]].text!r:.200}")
            parts.append(rm_B.float()[:, None])
            weights.append(self.reward_model_weight)
            names.append("reward_model")
        return RewardScores(torch.cat(parts, dim=1), torch.tensor(weights), names)

    def _micro_batches(self, dataset, run) -> list:
        local = list(range(len(dataset)))
        return [self.make_batch(dataset, local[i:i + self.micro_batch_size], self.packed)
                for i in range(0, len(local), self.micro_batch_size)]

    def _log_rollouts(self, step: int, dataset, scores, dp) -> None:
        records = [{"step": step + 1, "prompt_index": e.prompt_index, "sample_index": e.sample_index,
                    "prompt": e.prompt, "completion": e.text, "completion_ids": e.completion_ids.tolist(),
                    "truncated": e.truncated, "reward": e.reward,
                    "advantage": e.advantage,
                    "rewards": {name: _finite_or_none(float(scores.per_function_BF[k, f]))
                                for f, name in enumerate(scores.names)}}
                   for k, e in enumerate(dataset.examples)]
        records = gather_objects(records, dp)
        if dp.rank == 0:
            with open(self.rollouts_file, "a") as f:
                for r in records:
                    f.write(json.dumps({**r, "reward": _finite_or_none(r["reward"])}, default=str) + "\n")

    @torch.no_grad()
    def validate(self, layout, count, run) -> dict[str, float]:
        """val/reward: the mean reward of val_num_generations completions of each of the first `count`
        validation prompts (all: None), sampled as in training from a fixed seed (the same draws at every
        validation, so changes come from the model)."""
        s, dp = self.settings, run.dp
        items = list(layout.items if count is None else layout.items[:count])
        per_rank = -(-len(items) // dp.size)
        share, first = items[dp.rank * per_rank:(dp.rank + 1) * per_rank], dp.rank * per_rank
        dataset = generate_rollouts(self.engine, layout.dataset, share, first,
                                    s.sampling(step_seed(self.seed, 0, VALIDATION_STREAM), s.val_num_generations))
        scores = self.score(dataset)
        columns = [scores.rewards_B] + list(scores.per_function_BF.T)
        names = ["reward"] + [f"rewards/{name}/mean" for name in self.reward_names]
        totals = torch.zeros(2 * len(names), dtype=torch.float64)
        for k, column in enumerate(columns):
            valid = ~torch.isnan(column)
            totals[2 * k], totals[2 * k + 1] = column[valid].double().sum(), valid.sum()
        totals = dp.all_reduce_sum(totals)
        return {name: float(totals[2 * k] / totals[2 * k + 1]) if totals[2 * k + 1] > 0 else float("nan")
                for k, name in enumerate(names)}


def _finite_or_none(x: Any):
    return x if isinstance(x, float) and x == x else None
