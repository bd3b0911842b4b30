"""The GRPO family as pure tensor functions: group advantages, the clipped policy loss of each
`loss_type` with its global normaliser, the metric sums GRPO logs, and chunked temperature-scaled
log-probs and entropy (and `PolicyHead`, the head an online-RL model's forward ends in).

This file owns the maths of TRL's `GRPOTrainer` (1.16) loss and advantages, plus TRL's RLOO baseline
and NeMo-RL's REINFORCE++; it knows nothing of generation, reward functions, models or configs.

Loss per completion token (ℓ policy log-prob, ℓ_old the rollout's, m the mask, A the advantage):
    r      = exp(ℓ − ℓ_old)  (token level) | exp(Σ_t m(ℓ − ℓ_old) / max(Σ_t m, 1)) (sequence level, GSPO)
    loss_t = −min(min(r, δ)·A, clip(r, 1 − ε, 1 + ε_high)·A) + β·r·k3_t
with k3_t = e^(ℓ_ref−ℓ) − 1 − (ℓ_ref − ℓ), the factor r only with use_bias_correction_kl (TRL's default),
the cap δ only when `delta` is set, and the KL term only when β ≠ 0.

A micro-batch returns its *share* of the global-batch loss (sums divided by a count over the whole
global batch), so summing the shares of all micro-batches and ranks gives the loss of the global batch
(`tests/test_policy_losses.py` checks it). The global count of each `loss_type`:
    loss_type  per micro-batch                                  divided by (keyword)
    grpo       Σ_rows (Σ_t m·loss / max(Σ_t m, 1))               num_sequences: rows of the global batch
    bnpo       Σ m·loss / max(Σ m, 1)                            num_micro_batches: micro-batches of the global batch
    dr_grpo    Σ m·loss                                          num_sequences · max_completion_length
    dapo       Σ m·loss                                          num_items: completion tokens of the global batch
Each defaults to this micro-batch's own count, which is TRL's loss without accumulation. `bnpo` is
TRL's local-batch normalisation: its global loss is the mean of the micro-batches' token means, so
it depends on how the batch is split (by definition; `dapo` does not).

Choices where TRL, NeMo-RL and we differ (or where we had to pick):
  - `grpo` averages over every row, empty ones included (their token mean is 0 / max(0, 1)), as TRL.
  - Clip metrics use the ratio after the δ cap, as TRL's; at sequence level they count sequences
    (every row), at token level masked tokens. `kl` is the masked token mean of the term β multiplies.
  - `rloo` is TRL's leave-one-out baseline (mean of the other G−1 scorable rewards of the group), not
    its RLOO trainer (which folds a summed k1 KL into the reward); it takes scale_rewards like grpo,
    default none as TRL's RLOO. `reinforce_plus_plus` is NeMo-RL's: group mean subtracted, then whitened
    over the batch's valid tokens (biased variance, rsqrt(max(var, 1e-8))); each completion weighs as
    many tokens as it has, so it needs `num_tokens_B`, and it takes no scale_rewards.
  - `scale_rewards="batch"` keeps the group mean and divides by the batch std (n − 1) + 1e-4 (TRL).
  - A NaN reward (a completion no reward function scored) is left out of every mean and std and gets
    advantage 0 (TRL).

Shapes: B completions in the batch (G = num_generations consecutive per prompt, P = B / G prompts),
T completion tokens, N scored tokens, E hidden, V vocabulary.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nemo_aligner.losses.logprobs import softcap
from nemo_aligner.losses.ppo import kl_estimate, masked_sum

Tensor = torch.Tensor

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
RPP_VAR_FLOOR = 1e-8  # NeMo-RL REINFORCE++: rsqrt(max(var, 1e-8))


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def nanstd(x: Tensor, dim: Optional[int] = None, keepdim: bool = False) -> Tensor:
    """Standard deviation (n − 1) ignoring NaNs; NaN where fewer than two values are present."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.reshape(()))


def _mean_baseline(rewards_PG: Tensor) -> Tensor:
    return torch.nanmean(rewards_PG, dim=1, keepdim=True).expand_as(rewards_PG)


def _leave_one_out_baseline(rewards_PG: Tensor) -> Tensor:
    # mean of the other scorable rewards of the group: a group with one scorable reward gives 0/0 = NaN
    count_P1 = (~torch.isnan(rewards_PG)).sum(dim=1, keepdim=True).to(rewards_PG.dtype)
    total_P1 = torch.nansum(rewards_PG, dim=1, keepdim=True)
    return (total_P1 - rewards_PG) / (count_P1 - 1)


@dataclass(frozen=True)
class _Estimator:
    baseline: Callable[[Tensor], Tensor]
    default_scale: str
    scales: tuple[str, ...]
    token_whitened: bool = False


ESTIMATORS: dict[str, _Estimator] = {
    "grpo": _Estimator(_mean_baseline, "group", ("group", "batch", "none")),
    "rloo": _Estimator(_leave_one_out_baseline, "none", ("group", "batch", "none")),
    "reinforce_plus_plus": _Estimator(_mean_baseline, "none", ("none",), token_whitened=True),
}
ADVANTAGE_ESTIMATORS: tuple[str, ...] = tuple(ESTIMATORS)
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


def default_scale_rewards(estimator: str) -> str:
    """What scale_rewards means when not set: group for grpo (TRL), none for rloo and reinforce_plus_plus."""
    return _estimator(estimator).default_scale


def _estimator(name: str) -> _Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"advantage_estimator={name!r}; expected one of {list(ESTIMATORS)}")
    return ESTIMATORS[name]


def _grouped(rewards_B: Tensor, num_generations: int) -> Tensor:
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards_B.shape)}")
    if num_generations < 1 or rewards_B.numel() % num_generations:
        raise ValueError(f"{rewards_B.numel()} rewards cannot be split into groups of num_generations="
                         f"{num_generations}; expected a multiple (each prompt's completions are consecutive)")
    return rewards_B.view(-1, num_generations)


def _reward_std(rewards_PG: Tensor, scale: str) -> Tensor:
    """Per-sample std [P, G] of the group (or of the whole batch); 0 where it does not exist (TRL)."""
    if scale == "batch":
        std = nanstd(rewards_PG) if rewards_PG.numel() > 1 else rewards_PG.new_zeros(())
        return std.expand_as(rewards_PG)
    if rewards_PG.shape[1] == 1:
        return torch.zeros_like(rewards_PG)
    return nanstd(rewards_PG, dim=1, keepdim=True).expand_as(rewards_PG)


def _token_whiten(adv_B: Tensor, num_tokens_B: Tensor) -> Tensor:
    """NeMo-RL's REINFORCE++ whitening over valid tokens, for per-sequence advantages."""
    weight_B = torch.where(torch.isnan(adv_B), 0.0, num_tokens_B.to(adv_B.dtype))
    total = weight_B.sum()
    if total == 0:
        return torch.zeros_like(adv_B)
    adv0_B = torch.nan_to_num(adv_B, nan=0.0)
    mean = (weight_B * adv0_B).sum() / total
    var = (weight_B * (adv0_B - mean) ** 2).sum() / total
    return (adv_B - mean) * var.clamp(min=RPP_VAR_FLOOR).rsqrt()


def group_advantages(rewards_B: Tensor, num_generations: int, estimator: str = "grpo",
                     scale_rewards: Optional[str] = None, num_tokens_B: Optional[Tensor] = None) -> Tensor:
    """Advantage [B] of each completion from the rewards [B] of the whole batch (G per prompt, consecutive).

    scale_rewards: group | batch | none; None = the estimator's default (`default_scale_rewards`).
    num_tokens_B: completion tokens of each row, needed by reinforce_plus_plus.
    NaN rewards are ignored by every statistic and get advantage 0.
    """
    spec = _estimator(estimator)
    scale = spec.default_scale if scale_rewards is None else scale_rewards
    if scale not in spec.scales:
        raise ValueError(f"scale_rewards={scale!r} with advantage_estimator={estimator!r}; expected one of "
                         f"{list(spec.scales)}" + (" (it whitens over the batch itself)" if spec.token_whitened else ""))
    rewards_PG = _grouped(rewards_B, num_generations)
    adv_PG = rewards_PG - spec.baseline(rewards_PG)
    if scale != "none":
        adv_PG = adv_PG / (_reward_std(rewards_PG, scale) + STD_EPS)
    adv_B = adv_PG.reshape(-1)
    if spec.token_whitened:
        if num_tokens_B is None or num_tokens_B.shape != rewards_B.shape:
            raise ValueError(f"advantage_estimator={estimator!r} whitens over tokens: it needs num_tokens_B "
                             f"[B] (completion tokens per row), got {None if num_tokens_B is None else tuple(num_tokens_B.shape)}")
        adv_B = _token_whiten(adv_B, num_tokens_B)
    return torch.nan_to_num(adv_B, nan=0.0)


def reward_metrics(rewards_B: Tensor, num_generations: int, scale_rewards: str = "group") -> dict[str, float]:
    """`reward`, `reward_std` and `frac_reward_zero_std` of the whole (gathered) rollout batch, as TRL:
    the zero-std fraction is per sample, of the batch std with scale_rewards=batch, else of the group's."""
    rewards_PG = _grouped(rewards_B, num_generations)
    std_PG = _reward_std(rewards_PG, "batch" if scale_rewards == "batch" else "group")
    is_zero = torch.isclose(std_PG, torch.zeros_like(std_PG))
    return {"reward": float(torch.nanmean(rewards_B)), "reward_std": float(nanstd(rewards_B)),
            "frac_reward_zero_std": float(is_zero.to(rewards_B.dtype).mean())}


def completion_metrics(num_tokens_B: Tensor, truncated_B: Tensor) -> dict[str, float]:
    """`completions/*` of the whole (gathered) rollout batch: lengths in tokens, fraction truncated."""
    lengths = num_tokens_B.to(torch.float64)
    return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated_B.to(torch.float64).mean())}


def mask_truncated(mask_BT: Tensor, truncated_B: Tensor) -> Tensor:
    """mask_truncated_completions: rows that hit the length limit (no EOS) get no loss at all (TRL)."""
    return mask_BT * (~truncated_B.bool()).unsqueeze(1).to(mask_BT.dtype)


# ---------------------------------------------------------------------------------------------
# Policy loss: importance level, then per-token loss, then one aggregation per loss_type
# ---------------------------------------------------------------------------------------------


def _token_level(log_ratio_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return log_ratio_BT


def _sequence_level(log_ratio_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return ((log_ratio_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).unsqueeze(-1)  # [B, 1]


IMPORTANCE_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"token": _token_level,
                                                                     "sequence": _sequence_level}


def _grpo(loss_BT: Tensor, mask_BT: Tensor, normaliser: Tensor) -> Tensor:
    return ((loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).sum() / normaliser


def _bnpo(loss_BT: Tensor, mask_BT: Tensor, normaliser: Tensor) -> Tensor:
    return (loss_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1) / normaliser


def _token_sum(loss_BT: Tensor, mask_BT: Tensor, normaliser: Tensor) -> Tensor:
    return (loss_BT * mask_BT).sum() / normaliser


def _rows(mask_BT: Tensor) -> float:
    return float(mask_BT.shape[0])


def _one(mask_BT: Tensor) -> float:
    return 1.0


def _tokens(mask_BT: Tensor) -> float:
    return float(mask_BT.sum())


@dataclass(frozen=True)
class _Aggregation:
    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    count_key: str  # the keyword that gives the global count
    unit: str  # what the count counts (an Algorithm's `unit`)
    local_count: Callable[[Tensor], float]  # this micro-batch's contribution to the global count


_AGGREGATIONS: dict[str, _Aggregation] = {
    "grpo": _Aggregation(_grpo, "num_sequences", "sequences", _rows),
    "bnpo": _Aggregation(_bnpo, "num_micro_batches", "micro_batches", _one),
    "dr_grpo": _Aggregation(_token_sum, "num_sequences", "sequences", _rows),
    "dapo": _Aggregation(_token_sum, "num_items", "tokens", _tokens),
}
POLICY_LOSS_TYPES: tuple[str, ...] = tuple(_AGGREGATIONS)
_COUNT_KEYS = ("num_items", "num_sequences", "num_micro_batches")


def _aggregation(loss_type: str) -> _Aggregation:
    if loss_type not in _AGGREGATIONS:
        raise ValueError(f"loss_type={loss_type!r} is not known; expected one of {list(_AGGREGATIONS)}")
    return _AGGREGATIONS[loss_type]


def policy_loss_unit(loss_type: str) -> str:
    """What the global normaliser of `loss_type` counts: tokens, sequences or micro_batches."""
    return _aggregation(loss_type).unit


def policy_loss_count_key(loss_type: str) -> str:
    """The keyword of `policy_loss` that takes the global count (num_items, num_sequences, num_micro_batches)."""
    return _aggregation(loss_type).count_key


def num_units(loss_type: str, mask_BT: Tensor) -> float:
    """This micro-batch's contribution to the global count of `loss_type` (summed over the global batch)."""
    return _aggregation(loss_type).local_count(mask_BT)


@dataclass
class PolicyLossOutput:
    """This micro-batch's share of the global-batch loss, and detached metric sums (reduce_policy_metrics)."""

    loss: Tensor
    sums: dict[str, Tensor]


def _check_inputs(logps_BT, old_logps_BT, advantages, mask_BT, ref_logps_BT, beta, epsilon, epsilon_high,
                  delta, importance_sampling_level) -> None:
    if logps_BT.dim() != 2:
        raise ValueError(f"logps must be [B, T], got shape {tuple(logps_BT.shape)}")
    for name, t in (("old_logps", old_logps_BT), ("mask", mask_BT), ("ref_logps", ref_logps_BT)):
        if t is not None and t.shape != logps_BT.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logps_BT.shape)} (the shape of logps)")
    if advantages.shape not in (logps_BT.shape[:1], logps_BT.shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B] = {tuple(logps_BT.shape[:1])} "
                         f"or [B, T] = {tuple(logps_BT.shape)}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}; expected one of "
                         f"{list(IMPORTANCE_LEVELS)}")
    if beta != 0 and ref_logps_BT is None:
        raise ValueError(f"beta={beta} needs ref_logps (the reference policy's log-probs), got None")
    if beta == 0 and ref_logps_BT is not None:
        raise ValueError("ref_logps given with beta=0: the KL term is off, so no reference pass is needed")
    if epsilon < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon={epsilon}, epsilon_high={epsilon_high}; expected both >= 0")
    if delta is not None and delta <= 0:
        raise ValueError(f"delta={delta}; expected a positive cap on the ratio (TRL recommends > 1 + epsilon_high)")


def _normaliser(loss_type: str, spec: _Aggregation, mask_BT: Tensor, counts: dict,
                max_completion_length: Optional[int]) -> Tensor:
    wrong = sorted(k for k, v in counts.items() if v is not None and k != spec.count_key)
    if wrong:
        raise ValueError(f"loss_type={loss_type!r} is normalised by {spec.count_key}, not {wrong}")
    count = counts[spec.count_key]
    count = spec.local_count(mask_BT) if count is None else float(count)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length <= 0:
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length > 0 (its constant), "
                             f"got {max_completion_length}")
        longest = int(mask_BT.sum(-1).max()) if mask_BT.numel() else 0
        if longest > max_completion_length:
            raise ValueError(f"a completion has {longest} tokens, more than max_completion_length="
                             f"{max_completion_length} that dr_grpo divides by")
        count *= max_completion_length
    return torch.as_tensor(max(count, 1.0), dtype=mask_BT.dtype, device=mask_BT.device)


def policy_loss_and_metrics(loss_type: str, logps_BT: Tensor, old_logps_BT: Tensor, advantages: Tensor,
                            mask_BT: Tensor, *, ref_logps_BT: Optional[Tensor] = None, beta: float = 0.0,
                            epsilon: float = 0.2, epsilon_high: Optional[float] = None,
                            delta: Optional[float] = None, importance_sampling_level: str = "token",
                            use_bias_correction_kl: bool = True, max_completion_length: Optional[int] = None,
                            num_items: Optional[float] = None, num_sequences: Optional[float] = None,
                            num_micro_batches: Optional[float] = None,
                            entropy_BT: Optional[Tensor] = None) -> PolicyLossOutput:
    """This micro-batch's share of the global-batch loss of `loss_type`, and its metric sums.

    advantages: [B] (one per completion) or [B, T]. `num_items` / `num_sequences` / `num_micro_batches`:
    the global count `loss_type` divides by (module docstring); only that one may be given, default this
    batch's. `entropy_BT` (optional, detached) adds `entropy_sum` to the metric sums.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    _check_inputs(logps_BT, old_logps_BT, advantages, mask_BT, ref_logps_BT, beta, epsilon, epsilon_high, delta,
                  importance_sampling_level)
    spec = _aggregation(loss_type)
    mask = mask_BT.to(logps_BT.dtype)
    counts = {"num_items": num_items, "num_sequences": num_sequences, "num_micro_batches": num_micro_batches}
    normaliser = _normaliser(loss_type, spec, mask, counts, max_completion_length)
    adv = advantages.to(logps_BT.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    ratio = torch.exp(IMPORTANCE_LEVELS[importance_sampling_level](logps_BT - old_logps_BT, mask))
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)  # delta caps only the unclipped term
    loss_BT = -torch.min(capped * adv, clipped * adv)
    kl_BT = None
    if beta != 0:
        kl_BT = kl_estimate(logps_BT, ref_logps_BT, "k3")
        if use_bias_correction_kl:
            kl_BT = kl_BT * ratio
        loss_BT = loss_BT + beta * kl_BT
    loss = spec.fn(loss_BT, mask, normaliser)
    per_sequence = importance_sampling_level == "sequence" and advantages.dim() == 1
    sums = _metric_sums(capped, adv, mask, epsilon, epsilon_high, per_sequence, kl_BT, entropy_BT)
    return PolicyLossOutput(loss, sums)


def policy_loss(loss_type: str, logps_BT: Tensor, old_logps_BT: Tensor, advantages: Tensor, mask_BT: Tensor,
                **params) -> Tensor:
    """The scalar loss of `policy_loss_and_metrics` (same arguments)."""
    return policy_loss_and_metrics(loss_type, logps_BT, old_logps_BT, advantages, mask_BT, **params).loss


def _metric_sums(ratio, adv, mask, epsilon, epsilon_high, per_sequence, kl_BT, entropy_BT) -> dict[str, Tensor]:
    with torch.no_grad():
        ratio, adv = ratio.detach(), adv.detach()
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        region = torch.maximum(low, high)
        # sequence level: one ratio per row, counted over rows (TRL); token level: over masked tokens
        if per_sequence:
            count_fn, units = (lambda x: x.sum()), mask.new_tensor(float(mask.shape[0]))
        else:
            count_fn, units = (lambda x: masked_sum(x.expand_as(mask), mask)), mask.sum()
        sums = {"tokens": mask.sum(), "sequences": mask.new_tensor(float(mask.shape[0])), "clip_units": units,
                "clip_low_sum": count_fn(low), "clip_high_sum": count_fn(high), "clip_region_sum": count_fn(region)}
        if kl_BT is not None:
            sums["kl_sum"] = masked_sum(kl_BT.detach(), mask)
        if entropy_BT is not None:
            sums["entropy_sum"] = masked_sum(entropy_BT.detach(), mask)
    return sums


def reduce_policy_metrics(sums: dict[str, Tensor | float]) -> dict[str, float]:
    """TRL's names (`kl`, `entropy`, `clip_ratio/*`) from sums added over micro-batches and ranks."""
    s = {k: float(v) for k, v in sums.items()}
    tokens, units = max(s["tokens"], 1.0), max(s["clip_units"], 1.0)
    out = {"clip_ratio/low_mean": s["clip_low_sum"] / units, "clip_ratio/high_mean": s["clip_high_sum"] / units,
           "clip_ratio/region_mean": s["clip_region_sum"] / units}
    if "kl_sum" in s:
        out["kl"] = s["kl_sum"] / tokens
    if "entropy_sum" in s:
        out["entropy"] = s["entropy_sum"] / tokens
    return out


# ---------------------------------------------------------------------------------------------
# Chunked temperature-scaled log-probs and entropy (never a full [N, V] tensor)
# ---------------------------------------------------------------------------------------------


def _chunk_logits(hidden_NE: Tensor, weight_VE: Tensor, temperature: float, logit_softcap: Optional[float]) -> Tensor:
    # soft-capping belongs to the model's logits; the sampling temperature divides what comes out (TRL)
    logits_NV = softcap(F.linear(hidden_NE, weight_VE).float(), logit_softcap)
    return logits_NV / temperature if temperature != 1.0 else logits_NV


def _entropy(logits_NV: Tensor) -> Tensor:
    # H = logsumexp(z) − Σ softmax(z)·z: finite with a finite gradient even where probabilities underflow
    return torch.logsumexp(logits_NV, dim=-1) - (torch.softmax(logits_NV, dim=-1) * logits_NV).sum(-1)


def chunk_logprobs_and_entropy(hidden_NE: Tensor, weight_VE: Tensor, targets_N: Tensor, temperature: float = 1.0,
                               logit_softcap: Optional[float] = None, entropy_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(log p(target) [N], entropy [N]), fp32, of softmax(logits / temperature) for one chunk."""
    logits_NV = _chunk_logits(hidden_NE, weight_VE, temperature, logit_softcap)
    logps_N = -F.cross_entropy(logits_NV, targets_N, reduction="none")
    if entropy_grad:
        return logps_N, _entropy(logits_NV)
    with torch.no_grad():  # a metric only (GRPO's `entropy`): no graph, no saved [N, V] tensors for it
        return logps_N, _entropy(logits_NV.detach())


def chunk_logprobs_at_temperature(hidden_NE: Tensor, weight_VE: Tensor, targets_N: Tensor, temperature: float = 1.0,
                                  logit_softcap: Optional[float] = None) -> Tensor:
    logits_NV = _chunk_logits(hidden_NE, weight_VE, temperature, logit_softcap)
    return -F.cross_entropy(logits_NV, targets_N, reduction="none")


def chunk_entropy(hidden_NE: Tensor, weight_VE: Tensor, targets_N: Optional[Tensor] = None, temperature: float = 1.0,
                  logit_softcap: Optional[float] = None) -> Tensor:
    return _entropy(_chunk_logits(hidden_NE, weight_VE, temperature, logit_softcap))


def _map_chunks(fn: Callable, hidden_NE: Tensor, weight_VE: Tensor, targets_N: Optional[Tensor], chunk_size: int,
                temperature: float, logit_softcap: Optional[float], num_outputs: int, extra: tuple = ()):
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}; expected a positive integer")
    outputs = []
    for start in range(0, hidden_NE.shape[0], chunk_size):
        targets = None if targets_N is None else targets_N[start:start + chunk_size]
        args = (hidden_NE[start:start + chunk_size], weight_VE, targets, temperature, logit_softcap, *extra)
        # recompute each chunk's logits in backward instead of keeping them (as losses.logprobs does)
        out = checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)
        outputs.append(out if num_outputs > 1 else (out,))
    if not outputs:
        empty = hidden_NE.new_zeros(0, dtype=torch.float32)
        return (empty,) * num_outputs if num_outputs > 1 else empty
    cat = tuple(torch.cat(parts) for parts in zip(*outputs))
    return cat if num_outputs > 1 else cat[0]


def token_logprobs_at_temperature(hidden_NE: Tensor, weight_VE: Tensor, targets_N: Tensor, temperature: float = 1.0,
                                  chunk_size: int = 1024, logit_softcap: Optional[float] = None) -> Tensor:
    """log p(target) [N] fp32 under softmax(logits / temperature), a chunk of tokens at a time (TRL's
    policy log-probs are taken at the sampling temperature)."""
    return _map_chunks(chunk_logprobs_at_temperature, hidden_NE, weight_VE, targets_N, chunk_size, temperature,
                       logit_softcap, 1)


def chunked_entropy(hidden_NE: Tensor, weight_VE: Tensor, temperature: float = 1.0, chunk_size: int = 1024,
                    logit_softcap: Optional[float] = None) -> Tensor:
    """Entropy [N] fp32 of softmax(logits / temperature) at each position, a chunk at a time."""
    return _map_chunks(chunk_entropy, hidden_NE, weight_VE, None, chunk_size, temperature, logit_softcap, 1)


def token_logprobs_and_entropy(hidden_NE: Tensor, weight_VE: Tensor, targets_N: Tensor, temperature: float = 1.0,
                               chunk_size: int = 1024, logit_softcap: Optional[float] = None,
                               entropy_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(log p(target) [N], entropy [N]) fp32 from the same chunked pass over the vocabulary.

    The entropy is detached unless `entropy_grad` (PPO's entropy bonus needs its gradient; GRPO only logs
    it), which keeps the step's memory at that of the log-probs alone.
    """
    return _map_chunks(chunk_logprobs_and_entropy, hidden_NE, weight_VE, targets_N, chunk_size, temperature,
                       logit_softcap, 2, (entropy_grad,))


# ---------------------------------------------------------------------------------------------
# The policy head: what an online-RL model's forward ends in
# ---------------------------------------------------------------------------------------------


class PolicyFns(NamedTuple):
    """How one chunk is projected: fn(hidden_NE, weight_VE, targets_N, temperature, logit_softcap, entropy_grad)
    -> (log-probs [N], entropy [N]). The plain one is here; `parallel.tensor_parallel` installs the
    vocab-parallel one when the output weight is sharded."""

    logprobs_and_entropy: Callable


POLICY_PLAIN = PolicyFns(chunk_logprobs_and_entropy)


class PolicyHead(nn.Module):
    """forward(hidden [R, T, E], output weight [V, E], labels [R, T]) -> [R, T, 2]: (log p(label), entropy)
    of softmax(logits / temperature) at every scored position, 0 elsewhere; chunked, fp32, never a full
    [tokens, vocab] tensor. The entropy is detached unless `entropy_grad` (an entropy bonus)."""

    def __init__(self, chunk_size: int = 1024, temperature: float = 1.0, entropy_grad: bool = False):
        super().__init__()
        self.chunk_size, self.temperature, self.entropy_grad = chunk_size, temperature, entropy_grad
        self.logit_softcap = None  # the model's final_logit_softcapping (ModelWithHead sets it)
        self.fns = POLICY_PLAIN

    def forward(self, hidden_RTE: Tensor, weight_VE: Tensor, labels_RT: Tensor) -> Tensor:
        scored_RT = labels_RT != -100
        logps_N, entropy_N = _map_chunks(self.fns.logprobs_and_entropy, hidden_RTE[scored_RT], weight_VE,
                                         labels_RT[scored_RT], self.chunk_size, self.temperature, self.logit_softcap,
                                         2, (self.entropy_grad,))
        values_N2 = torch.stack([logps_N, entropy_N.to(logps_N.dtype)], dim=-1)
        return values_N2.new_zeros(*labels_RT.shape, 2).masked_scatter(scored_RT[..., None], values_N2)

    @staticmethod
    def output_trailing_shape() -> tuple:
        return (2,)

    @staticmethod
    def output_dtype() -> torch.dtype:
        return torch.float32
