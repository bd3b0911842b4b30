"""PPO's pure tensor maths: KL estimators, the per-token reward, GAE, masked whitening, and the
clipped policy and value losses, with the metric sums TRL's names are computed from.

This file owns the numbers of one PPO update (TRL's `PPOTrainer` as it was before its removal,
NeMo-Aligner's PPO actor/critic); it knows nothing of models, generation or configs. The GRPO family
(`losses/policy.py`) uses the KL estimators and masked sums from here.

A micro-batch returns its *share* of the global-batch loss: sums over its tokens divided by
`num_items`, the number of completion tokens in the whole global batch (default: this batch's), so
accumulation and data parallel never reweight tokens. Metrics come back as sums (`*_sum`, counts) that
the caller adds over micro-batches and ranks and divides once (`reduce_ppo_metrics`).

Choices where TRL and NeMo-Aligner differ (or where we had to pick):
  - The score goes on the last real completion token (NeMo-Aligner). TRL put it one position after
    the last token when there was room (the EOS position its `padding_mask_p1` kept), and so also had
    a value mask one token longer than the policy mask; here both use the same mask.
  - GAE skips masked positions: the next value of a token is the value of the next *real* token. With
    right padding (TRL's layout, values and rewards zeroed on padding) this is TRL's recursion exactly;
    with holes in the mask (tool outputs) it still bootstraps across them.
  - Every mean is over masked tokens. TRL's `approxkl`, `val/ratio` and `policy/entropy_avg` averaged
    over padding too (ratio 1, approxkl 0 there), and its `objective/entropy` added −1 for every
    padding token (it filled padded log-probs with 1.0).
  - `val/ratio_var` is the variance of the ratio over the global batch's tokens; TRL's was the
    variance of per-minibatch mean ratios, which micro-batch sums cannot give.
  - `use_absolute_kl` (NeMo-Aligner's older config) takes |k1|; k3 is never negative, so it is the
    same there (the config refuses the combination rather than ignore it).

Shapes: B completions, T completion tokens (right-padded; `mask_BT` 1 on real tokens).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

WHITEN_EPS = 1e-8  # TRL's masked_whiten: rsqrt(var + 1e-8)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` where `mask` is set (mask broadcast against values)."""
    return (values * mask).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions; an empty mask gives 0, not NaN."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over masked positions (TRL's `masked_var`: Bessel-corrected by default)."""
    count = mask.sum()
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked variance over {int(count)} token(s); expected at least {2 if unbiased else 1} "
                         "(the whitened batch has too few completion tokens)")
    centred = values - masked_mean(values, mask)
    var = masked_mean(centred ** 2, mask)
    return var * count / (count - 1) if unbiased else var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(values − mean) / sqrt(var + 1e-8) with mean and unbiased var over masked positions (TRL).

    `shift_mean=False` adds the mean back (TRL's reward whitening): only the spread changes.
    Positions outside the mask are transformed too; callers zero them if they need to.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence"): per token, policy ℓ vs reference ℓ_ref
# ---------------------------------------------------------------------------------------------


def _k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    return logps - ref_logps


def _k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio  # exp(r) − 1 − r, >= 0


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _k1, "k3": _k3}


def kl_estimate(logps_BT: Tensor, ref_logps_BT: Tensor, estimator: str = "k1", absolute: bool = False) -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate [B, T]: k1 = ℓ − ℓ_ref, k3 = e^(ℓ_ref−ℓ) − 1 − (ℓ_ref − ℓ).

    `absolute` takes |estimate| (NeMo-Aligner's use_absolute_kl).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    if logps_BT.shape != ref_logps_BT.shape:
        raise ValueError(f"ref_logps has shape {tuple(ref_logps_BT.shape)}, expected {tuple(logps_BT.shape)}")
    kl_BT = KL_ESTIMATORS[estimator](logps_BT, ref_logps_BT)
    return kl_BT.abs() if absolute else kl_BT


# ---------------------------------------------------------------------------------------------
# Rewards per token
# ---------------------------------------------------------------------------------------------


def apply_missing_eos_penalty(scores_B: Tensor, has_eos_B: Tensor, penalty: Optional[float]) -> Tensor:
    """TRL's `missing_eos_penalty`: subtract `penalty` from the score of every completion without EOS."""
    if penalty is None:
        return scores_B
    return scores_B - penalty * (~has_eos_B.bool()).to(scores_B.dtype)


def last_token_index(mask_BT: Tensor) -> Tensor:
    """Index of each row's last real token [B]; a row without any is an error (its score has no place)."""
    mask_BT = mask_BT.bool()
    empty_B = ~mask_BT.any(dim=1)
    if empty_B.any():
        raise ValueError(f"row {int(empty_B.nonzero()[0])} has no completion token to put its score on "
                         "(mask all zero); every completion needs at least one token")
    positions_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)
    return torch.where(mask_BT, positions_BT, -1).amax(dim=1)


def token_rewards(scores_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """(rewards [B, T], non-score rewards [B, T]): −kl_coef·KL on every real token, plus the score on the
    last real token; 0 outside the mask."""
    mask = mask_BT.to(kl_BT.dtype)
    non_score_BT = -kl_coef * kl_BT * mask
    last_B = last_token_index(mask_BT)
    rewards_BT = non_score_BT.clone()
    rows_B = torch.arange(rewards_BT.shape[0], device=rewards_BT.device)
    rewards_BT[rows_B, last_B] += scores_B.to(rewards_BT.dtype)
    return rewards_BT, non_score_BT


def whiten_rewards(rewards_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """TRL's optional reward whitening: spread only (shift_mean=False), 0 outside the mask."""
    return masked_whiten(rewards_BT, mask_BT, shift_mean=False) * mask_BT


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def gae(rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, backwards over the real tokens of each row.

    δ_t = r_t + γ·V_next − V_t and A_t = δ_t + γλ·A_next, where "next" is the next real token (V_next = 0
    and A_next = 0 after the last one); returns = A + V. Both [B, T], 0 outside the mask. Not whitened.
    """
    if not (rewards_BT.shape == values_BT.shape == mask_BT.shape):
        raise ValueError(f"rewards {tuple(rewards_BT.shape)}, values {tuple(values_BT.shape)} and mask "
                         f"{tuple(mask_BT.shape)} must have the same [B, T] shape")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma={gamma}, lam={lam}; expected both in [0, 1]")
    mask = mask_BT.to(values_BT.dtype)
    values_BT = values_BT.detach() * mask
    rewards_BT = rewards_BT.detach() * mask
    next_value_B = values_BT.new_zeros(values_BT.shape[0])
    next_adv_B = values_BT.new_zeros(values_BT.shape[0])
    advantages = []
    for t in reversed(range(values_BT.shape[1])):
        real_B = mask[:, t]
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        adv_B = (delta_B + gamma * lam * next_adv_B) * real_B
        # a masked position carries the next real token's value and advantage through unchanged
        next_value_B = torch.where(real_B.bool(), values_BT[:, t], next_value_B)
        next_adv_B = torch.where(real_B.bool(), adv_B, next_adv_B)
        advantages.append(adv_B)
    advantages_BT = torch.stack(advantages[::-1], dim=1)
    return advantages_BT, (advantages_BT + values_BT) * mask


def whiten_advantages(advantages_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Advantages whitened over the batch's real tokens (TRL, NeMo's normalize_advantage), 0 outside."""
    return masked_whiten(advantages_BT, mask_BT) * mask_BT


# ---------------------------------------------------------------------------------------------
# Clipped losses: each returns (sum over masked tokens, metric sums); the caller divides by num_items
# ---------------------------------------------------------------------------------------------


def clipped_policy_terms(logps_BT: Tensor, old_logps_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor,
                         cliprange: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_masked max(−A·r, −A·clip(r, 1 ± cliprange)) with r = exp(ℓ − ℓ_old), and its metric sums."""
    mask = mask_BT.to(logps_BT.dtype)
    log_ratio_BT = logps_BT - old_logps_BT
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - cliprange, 1.0 + cliprange)
    loss_BT = torch.max(unclipped_BT, clipped_BT)
    total = masked_sum(loss_BT, mask)
    with torch.no_grad():
        sums = {
            "pg_loss_sum": total.detach(),
            "pg_clip_sum": masked_sum((clipped_BT > unclipped_BT).to(mask.dtype), mask),
            "approxkl_sum": masked_sum(0.5 * log_ratio_BT ** 2, mask),
            "ratio_sum": masked_sum(ratio_BT, mask),
            "ratio_sq_sum": masked_sum(ratio_BT ** 2, mask),
        }
    return total, sums


def clipped_value_terms(values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor,
                        cliprange_value: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_masked ½·max((V − R)², (clip(V, V_old ± cliprange_value) − R)²), and its metric sums."""
    mask = mask_BT.to(values_BT.dtype)
    clipped_values_BT = torch.clamp(values_BT, old_values_BT - cliprange_value, old_values_BT + cliprange_value)
    unclipped_BT = (values_BT - returns_BT) ** 2
    clipped_BT = (clipped_values_BT - returns_BT) ** 2
    total = 0.5 * masked_sum(torch.max(unclipped_BT, clipped_BT), mask)
    with torch.no_grad():
        sums = {"vf_loss_sum": total.detach(),
                "vf_clip_sum": masked_sum((clipped_BT > unclipped_BT).to(mask.dtype), mask)}
    return total, sums


@dataclass
class PPOLossOutput:
    """This micro-batch's share of the global-batch loss, and detached metric sums (see reduce_ppo_metrics)."""

    loss: Tensor
    sums: dict[str, Tensor]


def ppo_loss(logps_BT: Tensor, old_logps_BT: Tensor, advantages_BT: Tensor, mask_BT: Tensor, *,
             values_BT: Optional[Tensor] = None, old_values_BT: Optional[Tensor] = None,
             returns_BT: Optional[Tensor] = None, cliprange: float = 0.2, cliprange_value: float = 0.2,
             vf_coef: float = 0.1, entropy_BT: Optional[Tensor] = None, entropy_coef: float = 0.0,
             num_items: Optional[float] = None) -> PPOLossOutput:
    """(pg + vf_coef·vf − entropy_coef·H) summed over masked tokens / num_items.

    The value terms are included when `values_BT` is given (a policy with a value head, as TRL); a
    separate critic calls `clipped_value_terms` itself. `num_items` = completion tokens in the global
    batch (default: this batch's).
    """
    _check_same_shape(mask_BT, logps_BT=logps_BT, old_logps_BT=old_logps_BT, advantages_BT=advantages_BT,
                      values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, entropy_BT=entropy_BT)
    if values_BT is not None and (old_values_BT is None or returns_BT is None):
        raise ValueError("values_BT needs old_values_BT and returns_BT (the rollout's values and GAE returns)")
    if entropy_coef != 0 and entropy_BT is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy_BT (per-token entropy), got None")
    mask = mask_BT.to(logps_BT.dtype)
    total, sums = clipped_policy_terms(logps_BT, old_logps_BT, advantages_BT, mask, cliprange)
    if values_BT is not None:
        vf_total, vf_sums = clipped_value_terms(values_BT, old_values_BT, returns_BT, mask, cliprange_value)
        total = total + vf_coef * vf_total
        sums.update(vf_sums)
    if entropy_BT is not None:
        entropy_total = masked_sum(entropy_BT, mask)
        total = total - entropy_coef * entropy_total
        sums["entropy_sum"] = entropy_total.detach()
    sums["tokens"] = mask.sum().detach()
    normaliser = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype, device=mask.device)
    return PPOLossOutput(total / normaliser.clamp(min=1), sums)


def _check_same_shape(mask_BT: Tensor, **named: Optional[Tensor]) -> None:
    if mask_BT.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask_BT.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != mask_BT.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(mask_BT.shape)} (the mask's)")


# ---------------------------------------------------------------------------------------------
# Metrics with TRL's names
# ---------------------------------------------------------------------------------------------


def rollout_metric_sums(scores_B: Tensor, kl_BT: Tensor, non_score_BT: Tensor, logps_BT: Tensor,
                        mask_BT: Tensor) -> dict[str, Tensor]:
    """Per-rollout sums behind `objective/*` (TRL: per-sequence sums, averaged over sequences)."""
    mask = mask_BT.to(kl_BT.dtype)
    with torch.no_grad():
        non_score_B = (non_score_BT * mask).sum(dim=1)
        return {
            "sequences": scores_B.new_tensor(float(scores_B.shape[0]), dtype=kl_BT.dtype),
            "kl_seq_sum": (kl_BT * mask).sum(),
            "neg_logp_seq_sum": (-logps_BT * mask).sum(),
            "non_score_seq_sum": non_score_B.sum(),
            "rlhf_reward_sum": (scores_B.to(kl_BT.dtype) + non_score_B).sum(),
            "score_sum": scores_B.to(kl_BT.dtype).sum(),
        }


def reduce_ppo_metrics(sums: dict[str, Tensor | float]) -> dict[str, float]:
    """TRL's metric names from sums added over micro-batches and ranks (whatever subset is present)."""
    s = {k: float(v) for k, v in sums.items()}
    out = {}
    if "sequences" in s:
        n = max(s["sequences"], 1.0)
        out.update({"objective/kl": s["kl_seq_sum"] / n, "objective/entropy": s["neg_logp_seq_sum"] / n,
                    "objective/non_score_reward": s["non_score_seq_sum"] / n,
                    "objective/rlhf_reward": s["rlhf_reward_sum"] / n, "objective/scores": s["score_sum"] / n})
    if "tokens" in s:
        tokens = max(s["tokens"], 1.0)
        mean_ratio = s["ratio_sum"] / tokens
        out.update({"policy/approxkl_avg": s["approxkl_sum"] / tokens, "policy/clipfrac_avg": s["pg_clip_sum"] / tokens,
                    "loss/policy_avg": s["pg_loss_sum"] / tokens, "val/ratio": mean_ratio,
                    "val/ratio_var": max(s["ratio_sq_sum"] / tokens - mean_ratio ** 2, 0.0)})
        if "vf_loss_sum" in s:
            out.update({"loss/value_avg": s["vf_loss_sum"] / tokens, "val/clipfrac_avg": s["vf_clip_sum"] / tokens})
        if "entropy_sum" in s:
            out["policy/entropy_avg"] = s["entropy_sum"] / tokens
    return out
