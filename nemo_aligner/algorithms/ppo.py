"""PPO as an online algorithm (training.protocol.Online): each step generates one completion of each of its
prompts, scores them with the reward model, runs the rollout policy's, the reference's (kl_coef > 0) and
the critic's forward passes, turns them into per-token rewards, GAE advantages and returns over the whole
batch, and trains num_ppo_epochs x num_mini_batches optimiser steps on the actor's clipped policy loss
(with the entropy bonus) and the critic's clipped value loss.

    targets = rollout_targets(scores_S, logps_SL, ref_logps_SL, values_SL, mask_SL, has_eos_S, settings)
    PPOAlgorithm(settings, ...)   the protocol; its `loss` is the actor's (head: log-probs + entropy)
    CriticLoss(settings)          the critic's loss (head: a value per position), run by the critic's executor

The maths is `losses/ppo.py` (verified against TRL's formulas); this file says which tensors go in. The
score of a completion (the reward model's, on prompt + completion) goes on its last real token, minus
`kl_coef`·KL on every token (k1 or k3, optionally |k1|); `missing_eos_penalty` is subtracted from the
score of a completion that ended without EOS; GAE runs over the completion's tokens; advantages (and
optionally rewards) are whitened over the *whole* step's tokens, so `rollout_targets` is called on the
global batch (every rank computes it on the gathered rollouts and keeps its share: data parallel gives
exactly what one process computes).

Both losses are this micro-batch's share of the global mini-batch loss: token sums divided by the
completion tokens of the whole mini-batch (`num_units`), as TRL's masked means over a mini-batch.

The value of completion token t is the critic's score head read where the policy's log-prob of t is read
(the position before t: the state t is chosen in), as TRL's `full_value[:, context_length - 1 : -1]`.

Shapes: S completions (sequences), L completion tokens (right-padded; `mask_SL` 1 on real tokens).
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from nemo_aligner.generation.params import SamplingParams
from nemo_aligner.losses.policy import PolicyHead, completion_metrics
from nemo_aligner.losses.ppo import (
    apply_missing_eos_penalty, clipped_policy_terms, clipped_value_terms, gae, kl_estimate, masked_sum,
    reduce_ppo_metrics, rollout_metric_sums, token_rewards, whiten_advantages, whiten_rewards,
)
from nemo_aligner.models.offload import resident
from nemo_aligner.rollout import (
    VALIDATION_STREAM, PhaseTimes, Rollout, RolloutBatch, collate_rollout, gather_objects, generate_rollouts,
    per_sequence, rank_share, step_seed,
)

Tensor = torch.Tensor


@dataclass
class RolloutTargets:
    """What one step's rollouts train towards, [S, L] (0 outside the mask), and the rollout metric sums."""

    advantages_SL: Tensor
    returns_SL: Tensor
    rewards_SL: Tensor
    scores_S: Tensor  # after missing_eos_penalty (TRL's objective/scores is the penalised score)
    sums: dict


def rollout_targets(scores_S: Tensor, logps_SL: Tensor, ref_logps_SL: Tensor | None, values_SL: Tensor,
                    mask_SL: Tensor, has_eos_S: Tensor, settings) -> RolloutTargets:
    """Per-token rewards (score on the last real token − kl_coef·KL), GAE, whitening, for the global batch.

    settings: model.ppo (config.ppo.PPOConfig). ref_logps_SL None = no reference (kl_coef 0): KL is 0."""
    mask = mask_SL.to(logps_SL.dtype)
    scores_S = apply_missing_eos_penalty(scores_S.to(logps_SL.dtype), has_eos_S, settings.missing_eos_penalty)
    if ref_logps_SL is None:
        kl_SL = torch.zeros_like(logps_SL)
    else:
        kl_SL = kl_estimate(logps_SL, ref_logps_SL, settings.kl_estimator, settings.use_absolute_kl) * mask
    rewards_SL, non_score_SL = token_rewards(scores_S, kl_SL, mask, settings.kl_coef)
    if settings.whiten_rewards:
        rewards_SL = whiten_rewards(rewards_SL, mask)
    advantages_SL, returns_SL = gae(rewards_SL, values_SL, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages_SL = whiten_advantages(advantages_SL, mask)
    sums = rollout_metric_sums(scores_S, kl_SL, non_score_SL, logps_SL, mask)
    return RolloutTargets(advantages_SL, returns_SL, rewards_SL, scores_S, sums)


def rollout_metrics(sums: dict) -> dict[str, float]:
    """objective/* (TRL's names) from rollout_metric_sums."""
    return reduce_ppo_metrics(sums)


# ------------------------------------------------------------------------------- per-token fields
def per_token_field(batch, name: str) -> Tensor:
    """[S, L_max] of `extra[name]` of the batch's completions (in its sequence order), 0-padded."""
    examples = [batch.rollout.examples[int(i)] for i in batch.example_indices]
    arrays = [np.asarray(e.extra[name], dtype=np.float32) for e in examples]
    out = torch.zeros(len(arrays), max(len(a) for a in arrays), dtype=torch.float32)
    for s, a in enumerate(arrays):
        out[s, :len(a)] = torch.from_numpy(a)
    return out.to(batch.input_ids.device)


def num_completion_tokens(batch) -> int:
    return int(sum(batch.rollout.examples[int(i)].num_labels for i in batch.example_indices))


# ------------------------------------------------------------------------------- the algorithm
@dataclass
class PPOSettings:
    """model.ppo as the algorithm uses it (the loss part of a run's identity)."""

    num_ppo_epochs: int
    num_mini_batches: int
    kl_coef: float
    kl_estimator: str
    use_absolute_kl: bool
    missing_eos_penalty: float | None
    whiten_rewards: bool
    gamma: float
    lam: float
    whiten_advantages: bool
    cliprange: float
    cliprange_value: float
    vf_coef: float
    entropy_bonus: float
    temperature: float
    max_new_tokens: int
    top_k: int
    top_p: float
    end_strings: list  # a list, as the identity stored in checkpoints reads back from JSON
    chunk_size: int = 1024

    @classmethod
    def from_config(cls, ppo, seq_length: int, global_batch_size: int) -> "PPOSettings":
        """ppo: model.ppo (config.ppo.PPOSection); seq_length: the run's sequence length."""
        _, num_mini_batches = ppo.rollout_batches(global_batch_size)
        return cls(num_ppo_epochs=ppo.num_ppo_epochs, num_mini_batches=num_mini_batches, kl_coef=ppo.kl_coef,
                   kl_estimator=ppo.kl_estimator, use_absolute_kl=ppo.use_absolute_kl,
                   missing_eos_penalty=ppo.missing_eos_penalty, whiten_rewards=ppo.whiten_rewards, gamma=ppo.gamma,
                   lam=ppo.lam, whiten_advantages=ppo.whiten_advantages, cliprange=ppo.cliprange,
                   cliprange_value=ppo.cliprange_value, vf_coef=ppo.vf_coef, entropy_bonus=ppo.entropy_bonus,
                   temperature=ppo.temperature, max_new_tokens=ppo.length_params.max_length or seq_length // 2,
                   top_k=ppo.sampling_params.top_k, top_p=ppo.sampling_params.top_p,
                   end_strings=list(ppo.sampling_params.end_strings), chunk_size=ppo.logprob_chunk_size)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef != 0

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, num_samples=1, seed=seed, stop=tuple(self.end_strings))


class CriticLoss:
    """The critic's half of the protocol (its run's executor calls it): vf_coef x the clipped value loss."""

    def __init__(self, settings: PPOSettings):
        self.settings = settings

    def loss(self, batch: RolloutBatch, scores_RT: Tensor, num_tokens_global: int):
        values_SL, mask_SL = per_sequence(scores_RT, batch)
        mask = mask_SL.to(values_SL.dtype)
        total, sums = clipped_value_terms(values_SL, per_token_field(batch, "values"), per_token_field(batch, "returns"),
                                          mask, self.settings.cliprange_value)
        loss = self.settings.vf_coef * total / max(num_tokens_global, 1)
        return loss, {**sums, "critic_loss": loss.detach()}


class PPOAlgorithm:
    """The algorithm protocol (training.protocol) and its Online part for PPO. The recipe sets `engine` (a
    GenerationEngine on the actor), `reward_model` (rewards.RewardModel) and `reference`
    (rollout.RolloutReference, or None when kl_coef is 0) once the run objects exist; the run the loop passes
    is a `parallel.actor_critic.ActorCriticRun` (the critic's values come from it).

    `loss` is the actor's (the critic's is `self.critic_loss`, run by the critic's executor on the same
    micro-batches: `parallel.actor_critic.ActorCriticExecutor`)."""

    unit = "tokens"
    headline_metrics = ("objective/scores", "loss/policy_avg")

    def __init__(self, settings: PPOSettings, *, pad_id: int, seed: int, num_rollout_samples: int,
                 forward_micro_batch_size: int, packed: bool = False, pack_size: int | None = None,
                 num_val_samples: int | None = None):
        """num_val_samples: validation prompts per validation at most (None = what the loop asks for)."""
        self.settings, self.pad_id, self.seed = settings, pad_id, seed
        self.num_val_samples = num_val_samples
        self.items_per_step = num_rollout_samples  # prompts per step, one completion each
        # the loop's online step: num_iterations passes, each one optimiser step per mini-batch (contiguous
        # parts of every rank's rollout, which `rollout` shuffles once per step)
        self.num_iterations, self.num_mini_batches = settings.num_ppo_epochs, settings.num_mini_batches
        self.forward_micro_batch_size, self.packed, self.pack_size = forward_micro_batch_size, packed, pack_size
        self.critic_loss = CriticLoss(settings)
        self.engine = self.reward_model = self.reference = None
        # model.ppo.offload_*: set by the recipe; the frozen models wait on the CPU between their passes and the
        # optimiser's state during the rollout (training.offload; no-ops on a CPU run)
        self.offload_reference = self.offload_reward_model = self.offload_optimizer_state = False
        self.device = torch.device("cpu")
        self._step = 0
        self._clock = None  # (when this process's first step began, completions of the steps finished since)

    # ------------------------------------------------------------------ the protocol (actor)
    def head(self) -> PolicyHead:
        s = self.settings
        return PolicyHead(s.chunk_size, s.temperature, entropy_grad=s.entropy_bonus != 0)

    def make_batch(self, dataset, items, packed: bool) -> RolloutBatch:
        return collate_rollout(dataset, items, self.pad_id, self.packed, self.pack_size)

    @staticmethod
    def num_units(batch: RolloutBatch) -> int:
        return num_completion_tokens(batch)

    def loss(self, batch: RolloutBatch, outputs_RT2: Tensor, num_tokens_global: int):
        """Clipped policy loss minus entropy_bonus x entropy, token sums over the mini-batch's tokens."""
        s = self.settings
        values_SL2, mask_SL = per_sequence(outputs_RT2, batch)
        logps_SL, entropy_SL = values_SL2[..., 0], values_SL2[..., 1]
        mask = mask_SL.to(logps_SL.dtype)
        total, sums = clipped_policy_terms(logps_SL, batch.old_logps_SL.to(logps_SL.device),
                                           per_token_field(batch, "advantages"), mask, s.cliprange)
        entropy_total = masked_sum(entropy_SL, mask)
        if s.entropy_bonus:
            total = total - s.entropy_bonus * entropy_total
        loss = total / max(num_tokens_global, 1)
        return loss, {**sums, "entropy_sum": entropy_total.detach(), "tokens": mask.sum().detach(),
                      "actor_loss": loss.detach()}

    @staticmethod
    def reduce_metrics(sums: dict, num_tokens_global: int) -> dict[str, float]:
        """TRL's policy/*, loss/*, val/* names; loss = actor + critic shares (the total that was minimised)."""
        out = reduce_ppo_metrics(sums)
        out["loss"] = float(sums["actor_loss"]) + float(sums.get("critic_loss", 0.0))
        return out

    # ------------------------------------------------------------------ online
    def sync_weights(self, model) -> None:
        self.engine.sync_weights(getattr(model, "actor", model))

    def rollout(self, prompts, items: list, step: int, run) -> Rollout:
        """This rank's completions of its share of the step's prompts, with the reward model's scores, the
        rollout policy's log-probs, the reference's (kl_coef > 0) and the critic's values; then the targets
        (rewards, GAE, whitening) over the whole batch."""
        s, dp, times = self.settings, run.dp, PhaseTimes()
        self._step = step
        share, first = rank_share(items, dp)
        with times.phase("generation"):
            dataset = generate_rollouts(self.engine, prompts, share, first, s.sampling(step_seed(self.seed, step)))
        num_tokens = dp.all_reduce_sum(torch.tensor([float(sum(e.num_labels for e in dataset.examples))])).item()
        times.add_tokens("generation", num_tokens)
        batches = self._micro_batches(dataset)
        with times.phase("rewards"), resident(self.reward_model.module, self.device, self.offload_reward_model):
            scores_S = self.reward_model.score([e.prompt_ids for e in dataset.examples],
                                               [e.completion_ids for e in dataset.examples])
        with times.phase("old_logps"):  # the rollout policy's log-probs, as the training forward computes them
            outs = run.executor.forward_only(run.policy, batches, lambda b, out: per_sequence(out[..., 0], b)[0])
            for batch, logps_SL in zip(batches, outs):
                dataset.set_per_token("old_logps", batch.example_indices, logps_SL)
        if self.reference is not None:
            frozen = self.reference.module if self.reference.frozen_copy else None  # never the policy itself
            with times.phase("reference"), resident(frozen, self.device, self.offload_reference):
                self.reference.fill(dataset, batches, run.executor)
        with times.phase("values"):
            outs = run.critic_values(batches, lambda b, out: per_sequence(out.float(), b)[0])
            for batch, values_SL in zip(batches, outs):
                _set_extra(dataset, "values", batch.example_indices, values_SL)
        for phase in ("rewards", "old_logps", "reference", "values"):
            if phase in times.seconds:
                times.add_tokens(phase, num_tokens)
        targets, has_eos_B, lengths_B = self._targets(dataset, scores_S, dp)
        self._shuffle(dataset, step, dp.rank)
        metrics = {**rollout_metrics(targets.sums), **completion_metrics(lengths_B, ~has_eos_B),
                   "val/num_eos_tokens": float(has_eos_B.sum()), **self._episodes_per_second(len(items))}
        return Rollout(dataset, metrics, times)

    def _episodes_per_second(self, num_completions: int) -> dict:
        """TRL's `eps`: completions per second over the steps this process has finished (from step 2 on)."""
        now = time.perf_counter()
        if self._clock is None:
            self._clock = (now, 0)
        started, done = self._clock
        self._clock = (started, done + num_completions)
        return {"eps": done / (now - started)} if done else {}

    def _shuffle(self, dataset, step: int, rank: int) -> None:
        """With several mini-batches, this rank's completions in a seeded order (seed, step, rank), so the loop's
        contiguous mini-batches are random subsets (TRL draws a new permutation every epoch; here the step's
        epochs share one)."""
        if self.num_mini_batches > 1:
            order = np.random.default_rng([self.seed, step, rank]).permutation(len(dataset.examples))
            dataset.examples[:] = [dataset.examples[i] for i in order]

    def _micro_batches(self, dataset) -> list:
        local = list(range(len(dataset)))
        size = self.forward_micro_batch_size
        return [self.make_batch(dataset, local[i:i + size], self.packed) for i in range(0, len(local), size)]

    def _targets(self, dataset, scores_S: Tensor, dp) -> tuple[RolloutTargets, Tensor, Tensor]:
        """rollout_targets over the global batch (every rank computes it on the gathered rollouts, so data
        parallel gives exactly one process's numbers); this rank's advantages and returns stored per completion."""
        local = [(e.old_logps, e.ref_logps, e.extra["values"], float(scores_S[k]), not e.truncated)
                 for k, e in enumerate(dataset.examples)]
        rows = gather_objects(local, dp)
        logps_BL, mask_BL = _stack([r[0] for r in rows])
        ref_BL = _stack([r[1] for r in rows])[0] if self.reference is not None else None
        values_BL, _ = _stack([r[2] for r in rows])
        scores_B = torch.tensor([r[3] for r in rows], dtype=torch.float32)
        has_eos_B = torch.tensor([r[4] for r in rows], dtype=torch.bool)
        targets = rollout_targets(scores_B, logps_BL, ref_BL, values_BL, mask_BL, has_eos_B, self.settings)
        first = dp.rank * len(dataset)
        for k, e in enumerate(dataset.examples):
            n = e.num_labels
            e.extra["advantages"] = targets.advantages_SL[first + k, :n].numpy().copy()
            e.extra["returns"] = targets.returns_SL[first + k, :n].numpy().copy()
            e.reward = float(targets.scores_S[first + k])
        return targets, has_eos_B, mask_BL.sum(dim=1)

    @torch.no_grad()
    def validate(self, layout, count, run) -> dict[str, float]:
        """val/objective/scores: the reward model's mean score of one completion of each of the first `count` validation
        prompts (all: None), sampled as in training from a fixed seed (the same draws at every validation)."""
        dp = run.dp
        items = list(layout.items if count is None else layout.items[:count])
        items = items[:self.num_val_samples] if self.num_val_samples else items
        per_rank = -(-len(items) // dp.size)
        share, first = items[dp.rank * per_rank:(dp.rank + 1) * per_rank], dp.rank * per_rank
        seed = step_seed(self.seed, 0, VALIDATION_STREAM)
        dataset = generate_rollouts(self.engine, layout.dataset, share, first, self.settings.sampling(seed))
        with resident(self.reward_model.module, self.device, self.offload_reward_model):
            scores = self.reward_model.score([e.prompt_ids for e in dataset.examples],
                                             [e.completion_ids for e in dataset.examples])
        totals = dp.all_reduce_sum(torch.tensor([float(scores.double().sum()), float(len(scores))],
                                                dtype=torch.float64))
        return {"objective/scores": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")}


def _set_extra(dataset, name: str, indices, values_SL: Tensor) -> None:
    values = values_SL.detach().float().cpu().numpy()
    for s, i in enumerate(indices):
        example = dataset.examples[int(i)]
        example.extra[name] = values[s, :example.num_labels].copy()


def _stack(arrays: list) -> tuple[Tensor, Tensor]:
    """([B, L_max] values, [B, L_max] mask) of per-completion [L] arrays, right-padded with 0."""
    width = max(len(a) for a in arrays)
    out = torch.zeros(len(arrays), width, dtype=torch.float32)
    mask = torch.zeros(len(arrays), width, dtype=torch.float32)
    for b, a in enumerate(arrays):
        out[b, :len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        mask[b, :len(a)] = 1.0
    return out, mask
