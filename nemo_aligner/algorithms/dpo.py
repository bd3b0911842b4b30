"""One DPO-family micro-batch: from the policy's per-token log-probs (and the reference's), the
weighted loss and metric sums.

The loop owns accumulation and the optimiser; this file owns what a pair contributes. Losses are
normalised by the number of pairs in the *global* batch (passed in), so micro-batch size,
accumulation, packing and data parallel never reweight pairs. Metrics are returned as sums over
pairs so they can be added across micro-batches and ranks and divided once. Reference log-probs are
in the batch (precomputed, `algorithms.reference`) or filled before the step by `prepare`.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.config.dpo import DPOConfig
from nemo_aligner.data.preference.collate import PreferenceBatch, collate_pairs
from nemo_aligner.losses.logprobs import LogProbHead, sequence_sums
from nemo_aligner.losses.preference import (
    LOSS_TYPES, REFERENCE_FREE_LOSSES, combined_preference_loss, sft_loss_from_logps,
)

# NeMo-Aligner's metric names (train/ and val/ prefixes are added by the loop) plus TRL's.
MEAN_METRICS = ("loss", "preference_loss", "sft_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean",
                "rewards_margin_mean", "logps_chosen_mean", "logps_rejected_mean")


@dataclass
class DPOSettings:
    beta: float
    loss_types: list[str]
    loss_weights: list[float] | None
    label_smoothing: float
    average_log_probs: bool
    sft_average_log_probs: bool
    gt_reward_scale: float
    preference_loss_weight: float
    sft_loss_weight: float
    loss_kwargs: dict
    chunk_size: int

    @classmethod
    def from_config(cls, cfg: DPOConfig) -> "DPOSettings":
        names = [cfg.preference_loss] if isinstance(cfg.preference_loss, str) else list(cfg.preference_loss)
        for name in names:
            if name not in LOSS_TYPES:
                raise ValueError(f"model.dpo.preference_loss={name!r}; expected one of {sorted(LOSS_TYPES)}")
        avg = cfg.preference_average_log_probs
        return cls(beta=cfg.ref_policy_kl_penalty, loss_types=names, loss_weights=cfg.preference_loss_weights,
                   label_smoothing=cfg.label_smoothing, average_log_probs=avg,
                   sft_average_log_probs=avg if cfg.sft_average_log_probs is None else cfg.sft_average_log_probs,
                   gt_reward_scale=cfg.gt_reward_scale, preference_loss_weight=cfg.preference_loss_weight,
                   sft_loss_weight=cfg.sft_loss_weight, loss_kwargs=dict(cfg.loss_kwargs),
                   chunk_size=cfg.logprob_chunk_size)

    @property
    def needs_reference(self) -> bool:
        return self.preference_loss_weight != 0 and not set(self.loss_types) <= REFERENCE_FREE_LOSSES


def pair_sums(batch: PreferenceBatch, token_logps_RT: torch.Tensor):
    """(chosen sums, rejected sums, chosen token counts, rejected token counts), each [P], from dense
    per-token log-probs [R, T] (the log-prob head's output)."""
    sums, counts = sequence_sums(token_logps_RT, batch.labels, batch.seq_index, 2 * batch.num_pairs)
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def reference_pair_sums(batch: PreferenceBatch, token_logps_RT: torch.Tensor) -> torch.Tensor:
    """[P, 2] (chosen, rejected) summed log-probs: what a reference pass keeps of each micro-batch."""
    chosen, rejected, _, _ = pair_sums(batch, token_logps_RT)
    return torch.stack([chosen, rejected], dim=-1)


class DPOAlgorithm:
    """The algorithm protocol (training.protocol) for the DPO family."""

    unit = "pairs"
    headline_metrics = ("loss", "acc")

    def __init__(self, settings: DPOSettings, pad_id: int, reference=None):
        self.settings = settings
        self.pad_id = pad_id
        self.reference = reference  # a ModelReference run before each step, or None (precomputed / not needed)

    def head(self) -> LogProbHead:
        return LogProbHead(self.settings.chunk_size)

    @staticmethod
    def num_units(batch: PreferenceBatch) -> int:
        return batch.num_pairs

    def make_batch(self, dataset, items, packed: bool) -> PreferenceBatch:
        return collate_pairs(dataset, items, self.pad_id, packed)

    def prepare(self, batches, executor) -> None:
        """Reference log-probs for a whole global batch in one forward-only pass (ref_mode online / adapter);
        precomputed or reference-free runs need nothing."""
        if (self.settings.needs_reference and self.reference is not None
                and any(b.ref_chosen is None for b in batches)):
            self.reference.fill(batches, executor)

    def loss(self, batch: PreferenceBatch, token_logps_RT, num_pairs_global: int):
        """(loss, metric sums) from the policy's dense per-token log-probs [R, T]."""
        return self.loss_from_logprobs(batch, pair_sums(batch, token_logps_RT), self._reference_logprobs(batch),
                                       num_pairs_global)

    def loss_from_logprobs(self, batch: PreferenceBatch, policy, reference, num_pairs_global: int):
        """(loss, metric sums) from policy (chosen, rejected, chosen counts, rejected counts) and reference
        (chosen, rejected) log-probs, each [P]; the reference pair is (None, None) when not needed."""
        s = self.settings
        pc, pr, len_c, len_r = policy
        rc, rr = reference
        kwargs = dict(beta=s.beta, label_smoothing=s.label_smoothing, chosen_rewards=batch.chosen_rewards,
                      rejected_rewards=batch.rejected_rewards, gt_reward_scale=s.gt_reward_scale,
                      chosen_lengths=len_c, rejected_lengths=len_r, average_log_probs=s.average_log_probs,
                      **s.loss_kwargs)
        pref = torch.zeros_like(pc)
        if s.preference_loss_weight != 0:
            pref = combined_preference_loss(s.loss_types, s.loss_weights, pc, pr, rc, rr, **kwargs)
        sft = sft_loss_from_logps(pc, len_c, average_log_probs=s.sft_average_log_probs)
        per_pair = s.preference_loss_weight * pref + s.sft_loss_weight * sft
        loss = per_pair.sum() / num_pairs_global
        return loss, self._metric_sums(per_pair, pref, sft, pc, pr, rc, rr, len_c, len_r)

    def _reference_logprobs(self, batch):
        if not self.settings.needs_reference:
            return None, None
        if batch.ref_chosen is None:
            raise RuntimeError("reference log-probs are neither precomputed nor filled by a reference pass")
        return batch.ref_chosen, batch.ref_rejected

    @torch.no_grad()
    def _metric_sums(self, per_pair, pref, sft, pc, pr, rc, rr, len_c, len_r):
        s = self.settings
        if s.average_log_probs:
            pc, pr = pc / len_c.clamp(min=1), pr / len_r.clamp(min=1)
            if rc is not None:
                rc, rr = rc / len_c.clamp(min=1), rr / len_r.clamp(min=1)
        dc = pc - (rc if rc is not None else 0.0)
        dr = pr - (rr if rr is not None else 0.0)
        all_rewards = torch.cat([dc, dr])
        return {
            "loss": per_pair.sum(), "preference_loss": pref.sum(), "sft_loss": sft.sum(),
            "acc": (dc > dr).float().sum(),
            "rewards_chosen_mean": dc.sum(), "rewards_rejected_mean": dr.sum(),
            "rewards_margin_mean": (s.beta * (dc - dr)).sum(),
            "logps_chosen_mean": pc.sum(), "logps_rejected_mean": pr.sum(),
            "rewards_all_sum": all_rewards.sum(), "rewards_all_sumsq": all_rewards.square().sum(),
        }

    @staticmethod
    def reduce_metrics(sums: dict, num_pairs: int) -> dict[str, float]:
        """Per-pair means from summed metrics (after summing across micro-batches and ranks)."""
        out = {name: float(sums[name]) / num_pairs for name in MEAN_METRICS}
        n = 2 * num_pairs
        mean = float(sums["rewards_all_sum"]) / n
        var = max(float(sums["rewards_all_sumsq"]) / n - mean * mean, 0.0)
        out["rewards_all_mean"], out["rewards_all_std"] = mean, var ** 0.5
        return out
