"""One reward-model micro-batch: from the score head's dense [R, T] scores, each sequence's score at its
score position (`data.scores`: the last non-pad token), then the per-pair ranking loss and metric sums.

The loop owns accumulation and the optimiser; this file owns what a pair contributes. The loss is
normalised by the number of pairs in the *global* batch (passed in), so micro-batch size,
accumulation, packing and data parallel never reweight pairs. Metrics are sums over pairs (plus the
sum and sum of squares of every score, for NeMo-Aligner's rewards_all_mean / _std), divided once.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.data.preference.reward import RewardBatch, collate_reward_pairs
from nemo_aligner.data.scores import sequence_scores
from nemo_aligner.losses.reward import REWARD_LOSSES, reward_loss
from nemo_aligner.models.score import HEAD_DTYPES, ScoreHead

# NeMo-Aligner's metric names (train/ and val/ prefixes are added by the loop); the margin is TRL's
MEAN_METRICS = ("loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean", "rewards_margin_mean")


@dataclass
class RewardSettings:
    loss: str = "binary_ranking"
    center_rewards_coefficient: float | None = None
    head_dtype: str | None = "float32"

    @classmethod
    def from_config(cls, model_cfg) -> "RewardSettings":
        """model.reward_model_type, model.center_rewards_coefficient, model.force_head_dtype."""
        if model_cfg.reward_model_type not in REWARD_LOSSES:
            raise ValueError(f"model.reward_model_type={model_cfg.reward_model_type!r}; expected one of "
                             f"{sorted(REWARD_LOSSES)}")
        return cls(model_cfg.reward_model_type, model_cfg.center_rewards_coefficient, model_cfg.force_head_dtype)


def pair_scores(batch: RewardBatch, scores_RT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores [P], rejected scores [P]) from the head's dense scores."""
    scores_S = sequence_scores(batch, scores_RT, 2 * batch.num_pairs)
    return scores_S[0::2], scores_S[1::2]


class RewardModelAlgorithm:
    """The algorithm protocol (training.protocol) for reward models on preference pairs."""

    unit = "pairs"
    headline_metrics = ("loss", "acc")

    def __init__(self, settings: RewardSettings, pad_id: int):
        self.settings = settings
        self.pad_id = pad_id  # the score position of a sequence is its last token that is not pad_id

    def head(self) -> ScoreHead:
        return ScoreHead(HEAD_DTYPES[self.settings.head_dtype])

    @staticmethod
    def num_units(batch: RewardBatch) -> int:
        return batch.num_pairs

    def make_batch(self, dataset, items, packed: bool) -> RewardBatch:
        return collate_reward_pairs(dataset, items, self.pad_id, packed)

    def loss(self, batch: RewardBatch, scores_RT, num_pairs_global: int):
        """(this micro-batch's share of the global-batch loss, metric sums) from the dense scores [R, T]."""
        chosen_P, rejected_P = pair_scores(batch, scores_RT)
        per_pair = reward_loss(self.settings.loss, chosen_P, rejected_P, batch.margins,
                               self.settings.center_rewards_coefficient)
        return per_pair.sum() / num_pairs_global, self._metric_sums(per_pair, chosen_P, rejected_P)

    @staticmethod
    @torch.no_grad()
    def _metric_sums(per_pair, chosen_P, rejected_P) -> dict:
        every = torch.cat([chosen_P, rejected_P])
        return {"loss": per_pair.sum(), "acc": (chosen_P > rejected_P).float().sum(),
                "rewards_chosen_mean": chosen_P.sum(), "rewards_rejected_mean": rejected_P.sum(),
                "rewards_margin_mean": (chosen_P - rejected_P).sum(),
                "rewards_all_sum": every.sum(), "rewards_all_sumsq": every.square().sum()}

    @staticmethod
    def reduce_metrics(sums: dict, num_pairs: int) -> dict[str, float]:
        """Per-pair means, and the mean / std of every score of the global batch (chosen and rejected)."""
        out = {name: float(sums[name]) / num_pairs for name in MEAN_METRICS}
        n = 2 * num_pairs
        mean = float(sums["rewards_all_sum"]) / n
        out["rewards_all_mean"] = mean
        out["rewards_all_std"] = max(float(sums["rewards_all_sumsq"]) / n - mean * mean, 0.0) ** 0.5
        return out
