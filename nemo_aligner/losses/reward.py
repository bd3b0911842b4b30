"""Reward-model objectives: pure functions of each pair's scores, per pair (the caller sums and divides
by the pairs of the global batch).

binary_ranking (Bradley–Terry; InstructGPT, NeMo-Aligner's `reward_model_type: binary_ranking`, TRL's
RewardTrainer):   loss = −log σ(r_c − r_r − m)
with m the pair's margin (Llama 2, TRL's `margin` column; 0 without one). TRL's
`center_rewards_coefficient` c (Eisenstein et al. 2023) adds c · (r_c + r_r)² per pair: TRL writes
`loss += c * torch.mean((rewards_chosen + rewards_rejected) ** 2)` after the mean of the ranking
loss, i.e. both terms are means over the same pairs, so per pair it is exactly this sum.

Shapes: P pairs.
"""

import torch
import torch.nn.functional as F


def bradley_terry(chosen_P: torch.Tensor, rejected_P: torch.Tensor, margin_P: torch.Tensor | None = None):
    """−log σ(r_c − r_r − m) per pair."""
    delta_P = chosen_P - rejected_P
    if margin_P is not None:
        delta_P = delta_P - margin_P
    return -F.logsigmoid(delta_P)


def center_penalty(chosen_P: torch.Tensor, rejected_P: torch.Tensor, coefficient: float) -> torch.Tensor:
    """c · (r_c + r_r)² per pair: pulls the scores' mean towards 0 (TRL's center_rewards_coefficient)."""
    return coefficient * (chosen_P + rejected_P).square()


REWARD_LOSSES = {"binary_ranking": bradley_terry}


def reward_loss(name: str, chosen_P, rejected_P, margin_P=None, center_rewards_coefficient: float | None = None):
    """The per-pair loss `name` (REWARD_LOSSES), plus the centering term when its coefficient is set."""
    if name not in REWARD_LOSSES:
        raise ValueError(f"reward loss {name!r}; expected one of {sorted(REWARD_LOSSES)}")
    loss_P = REWARD_LOSSES[name](chosen_P, rejected_P, margin_P)
    if center_rewards_coefficient:
        loss_P = loss_P + center_penalty(chosen_P, rejected_P, center_rewards_coefficient)
    return loss_P
