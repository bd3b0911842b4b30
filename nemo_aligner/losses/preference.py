"""Per-pair preference losses (DPO family, TRL's loss types, SimPO, ORPO) as pure tensor functions.

This file owns the maths of every preference objective: it maps the summed response-token
log-probs of a batch of P (chosen, rejected) pairs to one loss per pair, plus the per-pair metrics
that trainers log. It knows nothing of models, batches on disk or configs.

Shapes: every tensor in this file is 1-D of shape [P] (one entry per pair).
Notation (see REFERENCE.md): pc, pr = policy log-probs of chosen / rejected; rc, rr = reference;
dc = pc - rc, dr = pr - rr, h = dc - dr, beta = KL penalty, eps = label smoothing,
g = gt_reward_scale * (Rc - Rr) from ground-truth rewards.

Choices where NeMo-Aligner and TRL differ (or where we had to pick):
  - `dpo` and `sigmoid` are the same loss, with cDPO label smoothing
    (1-eps)(-log s(beta h)) + eps(-log s(-beta h)).
  - `ipo` uses whatever log-probs it is given (sums, as NeMo-Aligner; TRL averages per token, which
    here is `average_log_probs=True`). beta is not applied to h.
  - `exo_pair` with label_smoothing 0 uses eps = 1e-3, as TRL does (eps = 0 would give log 0).
  - `bco_pair` uses a running-mean shift delta = 0: TRL subtracts a running mean of the rewards,
    which is state, and this file has none.
  - `aot` and `aot_unpaired` sort over the batch, so their output is in sorted order and no longer
    aligned with the input pairs; only its mean is meaningful.
  - `sigmoid_norm`, `simpo` and `orpo` always use per-token averages pc/|yc| (lengths required),
    whether or not `average_log_probs` is set; they never divide twice.
  - `orpo` returns only the odds-ratio term lambda * -log s(log_odds); ORPO's NLL term is the SFT
    loss, which the caller adds (e.g. with `sft_loss_from_logps` and its own weight).
  - A label_smoothing given to a loss that does not use it is an error, never silently ignored.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Default epsilon for exo_pair when label_smoothing is 0 (as TRL): KL to [1, 0] would be infinite.
EXO_DEFAULT_EPSILON = 1e-3
DEFAULT_SIMPO_GAMMA = 0.5
DEFAULT_DISCOPOP_TAU = 0.05


@dataclass(frozen=True)
class _Pairs:
    """Validated inputs of one batch of pairs; log-probs already averaged if `averaged`."""

    pc: Tensor
    pr: Tensor
    rc: Optional[Tensor]
    rr: Optional[Tensor]
    len_c: Optional[Tensor]
    len_r: Optional[Tensor]
    averaged: bool
    g: Optional[Tensor]
    beta: float
    eps: float

    @property
    def dc(self) -> Tensor:
        return self.pc - self.rc

    @property
    def dr(self) -> Tensor:
        return self.pr - self.rr

    @property
    def h(self) -> Tensor:
        return self.dc - self.dr

    def per_token(self, x: Tensor, lengths: Tensor) -> Tensor:
        """`x` divided by its token count unless the inputs were averaged already."""
        return x if self.averaged else x / lengths


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """cDPO: (1-eps)(-log s(z)) + eps(-log s(-z)); eps = 0 is plain -log s(z)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _bernoulli_kl(logit_p: Tensor, logit_q: Tensor) -> Tensor:
    """KL(Bern(s(logit_p)) || Bern(s(logit_q))), from log-sigmoids (stable for large logits)."""
    log_p, log_1mp = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_1mq = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)


def _log1m_exp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends; x is clamped below 0 so x = 0 stays finite."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------
# One function per objective: (pairs, **extra) -> per-pair loss [P]
# ---------------------------------------------------------------------------------------------


def _dpo(p: _Pairs) -> Tensor:
    return _smoothed_sigmoid(p.beta * p.h, p.eps)


def _ipo(p: _Pairs) -> Tensor:
    return (p.h - 1 / (2 * p.beta)) ** 2


def _rpo_sq(p: _Pairs) -> Tensor:
    return (p.beta * p.h - p.g) ** 2


def _rpo_bwd_kl(p: _Pairs) -> Tensor:
    return _bernoulli_kl(p.g, p.beta * p.h)


def _rpo_fwd_kl(p: _Pairs) -> Tensor:
    return _bernoulli_kl(p.beta * p.h, p.g)


def _hinge(p: _Pairs) -> Tensor:
    return torch.relu(1 - p.beta * p.h)


def _robust(p: _Pairs) -> Tensor:
    z = p.beta * p.h
    return (-(1 - p.eps) * F.logsigmoid(z) + p.eps * F.logsigmoid(-z)) / (1 - 2 * p.eps)


def _exo_pair(p: _Pairs) -> Tensor:
    eps = p.eps if p.eps > 0 else EXO_DEFAULT_EPSILON
    # softmax(beta [dc, dr]) = [s(beta h), s(-beta h)]; KL to the target [1-eps, eps].
    z = p.beta * p.h
    log_p, log_1mp = F.logsigmoid(z), F.logsigmoid(-z)
    return log_p.exp() * (log_p - math.log1p(-eps)) + log_1mp.exp() * (log_1mp - math.log(eps))


def _nca_pair(p: _Pairs) -> Tensor:
    zc, zr = p.beta * p.dc, p.beta * p.dr
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)


def _bco_pair(p: _Pairs) -> Tensor:
    return -F.logsigmoid(p.beta * p.dc) - F.logsigmoid(-p.beta * p.dr)


def _sppo_hard(p: _Pairs) -> Tensor:
    half_inv_beta = 1 / (2 * p.beta)
    return (p.dc - half_inv_beta) ** 2 + (p.dr + half_inv_beta) ** 2


def _apo_zero(p: _Pairs) -> Tensor:
    return torch.sigmoid(-p.beta * p.dc) + torch.sigmoid(p.beta * p.dr)  # 1 - s(x) == s(-x)


def _apo_down(p: _Pairs) -> Tensor:
    return torch.sigmoid(p.beta * p.dc) + torch.sigmoid(-p.beta * p.h)


def _discopop(p: _Pairs, discopop_tau: float) -> Tensor:
    z = p.beta * p.h
    # m * exp(-z) as exp(log m - z): for very negative z, m -> 0 and exp(-z) -> inf would give nan.
    exp_part = torch.exp(F.logsigmoid(z / discopop_tau) - z)
    return torch.sigmoid(-z / discopop_tau) * -F.logsigmoid(z) + exp_part


def _aot(p: _Pairs) -> Tensor:
    policy_sorted = torch.sort(p.pc - p.pr).values
    ref_sorted = torch.sort(p.rc - p.rr).values
    return _smoothed_sigmoid(p.beta * (policy_sorted - ref_sorted), p.eps)


def _aot_unpaired(p: _Pairs) -> Tensor:
    delta = torch.sort(p.dc).values - torch.sort(p.dr).values
    return _smoothed_sigmoid(p.beta * delta, p.eps)


def _sigmoid_norm(p: _Pairs) -> Tensor:
    return -F.logsigmoid(p.beta * (p.per_token(p.dc, p.len_c) - p.per_token(p.dr, p.len_r)))


def _sft(p: _Pairs) -> Tensor:
    return -p.pc


def _simpo(p: _Pairs, simpo_gamma: Optional[float], gamma_beta_ratio: Optional[float]) -> Tensor:
    if simpo_gamma is not None and gamma_beta_ratio is not None:
        raise ValueError(f"simpo: give simpo_gamma or gamma_beta_ratio, not both "
                         f"(got simpo_gamma={simpo_gamma}, gamma_beta_ratio={gamma_beta_ratio})")
    gamma = gamma_beta_ratio * p.beta if gamma_beta_ratio is not None else (
        DEFAULT_SIMPO_GAMMA if simpo_gamma is None else simpo_gamma)
    margin = p.per_token(p.pc, p.len_c) - p.per_token(p.pr, p.len_r)
    return _smoothed_sigmoid(p.beta * margin - gamma, p.eps)


def _orpo(p: _Pairs, orpo_lambda: Optional[float]) -> Tensor:
    lam = p.beta if orpo_lambda is None else orpo_lambda
    a_c, a_r = p.per_token(p.pc, p.len_c), p.per_token(p.pr, p.len_r)
    log_odds = (a_c - a_r) - (_log1m_exp(a_c) - _log1m_exp(a_r))
    return -lam * F.logsigmoid(log_odds)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LossSpec:
    fn: Callable[..., Tensor]
    smoothing: Optional[str] = None  # None: ignores eps; "closed": eps in [0, 0.5]; "open": [0, 0.5)
    extra: dict = field(default_factory=dict)  # accepted extra kwargs -> default
    needs_reference: bool = True
    needs_rewards: bool = False
    needs_lengths: bool = False


_LOSSES: dict[str, _LossSpec] = {
    "dpo": _LossSpec(_dpo, smoothing="closed"),
    "sigmoid": _LossSpec(_dpo, smoothing="closed"),
    "ipo": _LossSpec(_ipo),
    "rpo_sq": _LossSpec(_rpo_sq, needs_rewards=True),
    "rpo_bwd_kl": _LossSpec(_rpo_bwd_kl, needs_rewards=True),
    "rpo_fwd_kl": _LossSpec(_rpo_fwd_kl, needs_rewards=True),
    "hinge": _LossSpec(_hinge),
    "robust": _LossSpec(_robust, smoothing="open"),
    "exo_pair": _LossSpec(_exo_pair, smoothing="closed"),
    "nca_pair": _LossSpec(_nca_pair),
    "bco_pair": _LossSpec(_bco_pair),
    "sppo_hard": _LossSpec(_sppo_hard),
    "apo_zero": _LossSpec(_apo_zero),
    "apo_down": _LossSpec(_apo_down),
    "discopop": _LossSpec(_discopop, extra={"discopop_tau": DEFAULT_DISCOPOP_TAU}),
    "aot": _LossSpec(_aot, smoothing="closed"),
    "aot_unpaired": _LossSpec(_aot_unpaired, smoothing="closed"),
    "sigmoid_norm": _LossSpec(_sigmoid_norm, needs_lengths=True),
    "sft": _LossSpec(_sft, needs_reference=False),
    "simpo": _LossSpec(_simpo, smoothing="closed", extra={"simpo_gamma": None, "gamma_beta_ratio": None},
                       needs_reference=False, needs_lengths=True),
    "orpo": _LossSpec(_orpo, extra={"orpo_lambda": None}, needs_reference=False, needs_lengths=True),
}

LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset(n for n, s in _LOSSES.items() if not s.needs_reference)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _spec(loss_type: str) -> _LossSpec:
    if loss_type not in _LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is not known; expected one of {sorted(_LOSSES)}")
    return _LOSSES[loss_type]


def _check_shapes(named: dict[str, Optional[Tensor]]) -> None:
    shape = named["policy_chosen_logps"].shape
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D [P], got shape {tuple(shape)}")
    for name, t in named.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                             f"(the shape of policy_chosen_logps)")


def _check_label_smoothing(loss_type: str, spec: _LossSpec, eps: float) -> None:
    if spec.smoothing is None:
        if eps != 0:
            raise ValueError(f"label_smoothing={eps} is not used by loss_type={loss_type!r}; "
                             f"expected 0 (losses using it: {sorted(n for n, s in _LOSSES.items() if s.smoothing)})")
    elif spec.smoothing == "open" and not 0 <= eps < 0.5:
        raise ValueError(f"loss_type={loss_type!r} needs label_smoothing in [0, 0.5), got {eps}")
    elif not 0 <= eps <= 0.5:
        raise ValueError(f"loss_type={loss_type!r} needs label_smoothing in [0, 0.5], got {eps}")


def _resolve_extra(loss_type: str, spec: _LossSpec, extra: dict) -> dict:
    unknown = sorted(set(extra) - set(spec.extra))
    if unknown:
        raise ValueError(f"unknown keyword argument(s) {unknown} for loss_type={loss_type!r}; "
                         f"expected only {sorted(spec.extra) or 'none'}")
    return {**spec.extra, **extra}


def _lengths(lengths: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if lengths is None else lengths.to(dtype).clamp(min=1)


def _check_required(loss_type: str, spec: _LossSpec, refs, rewards, lengths, average_log_probs) -> None:
    if spec.needs_reference and any(r is None for r in refs):
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps, got None; "
                         f"only {sorted(REFERENCE_FREE_LOSSES)} are reference-free")
    if spec.needs_rewards and any(r is None for r in rewards):
        raise ValueError(f"loss_type={loss_type!r} needs chosen_rewards and rejected_rewards, got None")
    if (spec.needs_lengths or average_log_probs) and any(n is None for n in lengths):
        why = "average_log_probs=True" if average_log_probs else f"loss_type={loss_type!r}"
        raise ValueError(f"{why} needs chosen_lengths and rejected_lengths (response-token counts), got None")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def preference_loss(loss_type: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *, beta: float,
                    label_smoothing: float = 0.0, chosen_rewards: Optional[Tensor] = None,
                    rejected_rewards: Optional[Tensor] = None, gt_reward_scale: float = 1.0,
                    chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                    average_log_probs: bool = False, **extra) -> Tensor:
    """Per-pair loss [P] of `loss_type` from summed response-token log-probs [P].

    With `average_log_probs`, every log-prob (policy and reference) is divided by its token count
    (clamped to >= 1) first. Extra keyword arguments: `discopop_tau` (discopop), `simpo_gamma` or
    `gamma_beta_ratio` (simpo), `orpo_lambda` (orpo, default beta).
    """
    spec = _spec(loss_type)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_label_smoothing(loss_type, spec, label_smoothing)
    resolved_extra = _resolve_extra(loss_type, spec, extra)
    named = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                 chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_shapes(named)
    _check_required(loss_type, spec, (ref_chosen_logps, ref_rejected_logps), (chosen_rewards, rejected_rewards),
                    (chosen_lengths, rejected_lengths), average_log_probs)
    pairs = _make_pairs(named, spec, beta, label_smoothing, gt_reward_scale, average_log_probs)
    return spec.fn(pairs, **resolved_extra)


def _make_pairs(named: dict, spec: _LossSpec, beta: float, eps: float, gt_reward_scale: float,
                average_log_probs: bool) -> _Pairs:
    dtype = named["policy_chosen_logps"].dtype
    len_c, len_r = _lengths(named["chosen_lengths"], dtype), _lengths(named["rejected_lengths"], dtype)
    pc, pr = named["policy_chosen_logps"], named["policy_rejected_logps"]
    rc, rr = named["ref_chosen_logps"], named["ref_rejected_logps"]
    if not spec.needs_reference:
        rc = rr = None  # reference-free losses must not depend on a reference even if one is given
    if average_log_probs:
        pc, pr = pc / len_c, pr / len_r
        rc, rr = (None, None) if rc is None else (rc / len_c, rr / len_r)
    g = None
    if spec.needs_rewards:
        g = gt_reward_scale * (named["chosen_rewards"].to(dtype) - named["rejected_rewards"].to(dtype))
    return _Pairs(pc, pr, rc, rr, len_c, len_r, average_log_probs, g, beta, eps)


def combined_preference_loss(loss_types: list[str], weights: Optional[list[float]], *args, **kwargs) -> Tensor:
    """Weighted sum of per-pair losses (TRL's `loss_type` list with `loss_weights`, e.g. MPO).

    `args`/`kwargs` are those of `preference_loss`. `label_smoothing` and extra kwargs go only to the
    losses that use them; each must be used by at least one of `loss_types`. `aot`/`aot_unpaired`
    come out in sorted order, so adding them to another loss loses the per-pair alignment: only the
    mean of the result is meaningful then.
    """
    if not loss_types:
        raise ValueError("loss_types is empty; expected at least one loss type")
    weights = [1.0] * len(loss_types) if weights is None else list(weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"weights has {len(weights)} entries, expected {len(loss_types)} (one per loss type "
                         f"in {list(loss_types)})")
    specs = [_spec(t) for t in loss_types]
    _check_routable(loss_types, specs, kwargs)
    total = 0
    for loss_type, spec, weight in zip(loss_types, specs, weights):
        total = total + weight * preference_loss(loss_type, *args, **_route_kwargs(spec, kwargs))
    return total


_COMMON_KWARGS = {"beta", "chosen_rewards", "rejected_rewards", "gt_reward_scale", "chosen_lengths",
                  "rejected_lengths", "average_log_probs"}


def _check_routable(loss_types: list[str], specs: list[_LossSpec], kwargs: dict) -> None:
    accepted = _COMMON_KWARGS | {k for s in specs for k in s.extra}
    unknown = sorted(set(kwargs) - accepted - {"label_smoothing"})
    if unknown:
        raise ValueError(f"unknown keyword argument(s) {unknown} for loss_types={list(loss_types)}; "
                         f"expected among {sorted(accepted | {'label_smoothing'})}")
    if kwargs.get("label_smoothing", 0.0) != 0 and not any(s.smoothing for s in specs):
        raise ValueError(f"label_smoothing={kwargs['label_smoothing']} is used by none of "
                         f"loss_types={list(loss_types)}; expected 0")


def _route_kwargs(spec: _LossSpec, kwargs: dict) -> dict:
    routed = {k: v for k, v in kwargs.items() if k in _COMMON_KWARGS or k in spec.extra}
    if spec.smoothing and "label_smoothing" in kwargs:
        routed["label_smoothing"] = kwargs["label_smoothing"]
    return routed


def preference_metrics(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                       ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor], *,
                       beta: float) -> dict[str, Tensor]:
    """Detached per-pair metrics [P]; a missing reference (reference-free losses) counts as 0.

    `rewards_*` are NeMo-Aligner's (no beta); `*_scaled` and `margin_scaled` are TRL's
    `rewards/chosen`, `rewards/rejected`, `rewards/margins`.
    """
    pc, pr = policy_chosen_logps.detach(), policy_rejected_logps.detach()
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps.detach()
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps.detach()
    dc, dr = pc - rc, pr - rr
    return {
        "rewards_chosen": dc,
        "rewards_rejected": dr,
        "acc": (dc > dr).to(pc.dtype),
        "margin_scaled": beta * (dc - dr),
        "rewards_chosen_scaled": beta * dc,
        "rewards_rejected_scaled": beta * dr,
        "logps_chosen": pc,
        "logps_rejected": pr,
    }


def sft_loss_from_logps(policy_chosen_logps: Tensor, chosen_lengths: Optional[Tensor] = None, *,
                        average_log_probs: bool = False) -> Tensor:
    """Per-pair NLL of the chosen response [P]: -pc, or -pc/|yc| with `average_log_probs`."""
    if not average_log_probs:
        return -policy_chosen_logps
    if chosen_lengths is None:
        raise ValueError("average_log_probs=True needs chosen_lengths (response-token counts), got None")
    if chosen_lengths.shape != policy_chosen_logps.shape:
        raise ValueError(f"chosen_lengths has shape {tuple(chosen_lengths.shape)}, expected "
                         f"{tuple(policy_chosen_logps.shape)} (the shape of policy_chosen_logps)")
    return -policy_chosen_logps / _lengths(chosen_lengths, policy_chosen_logps.dtype)
