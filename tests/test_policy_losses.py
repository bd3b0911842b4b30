"""GRPO-family losses and advantages against independent reference code: plain-Python loops written
from TRL 1.16's GRPOTrainer formulas (and NeMo-RL's REINFORCE++), one token at a time, nothing from
the module under test."""

import math
import random

import pytest
import torch

from nemo_aligner.losses import (
    group_advantages,
    mask_truncated,
    policy_loss,
    policy_loss_and_metrics,
    reduce_policy_metrics,
)
from nemo_aligner.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    IMPORTANCE_LEVELS,
    POLICY_LOSS_TYPES,
    SCALE_REWARDS,
    chunked_entropy,
    completion_metrics,
    default_scale_rewards,
    num_units,
    policy_loss_count_key,
    reward_metrics,
    token_logprobs_and_entropy,
    token_logprobs_at_temperature,
)

torch.set_num_threads(1)
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# Reference: advantages (lists of floats, NaN = unscored)
# ---------------------------------------------------------------------------------------------


def _valid(xs):
    return [x for x in xs if not math.isnan(x)]


def _mean(xs):
    xs = _valid(xs)
    return sum(xs) / len(xs) if xs else NAN


def _std(xs):  # n - 1, NaN-aware
    xs = _valid(xs)
    if len(xs) < 2:
        return NAN
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ref_advantages(rewards, G, estimator, scale, num_tokens=None):
    groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
    out = []
    for group in groups:
        for j, r in enumerate(group):
            if estimator == "rloo":
                others = _valid(group[:j] + group[j + 1:])
                baseline = sum(others) / len(others) if others and not math.isnan(r) else NAN
            else:
                baseline = _mean(group)
            adv = r - baseline
            if scale == "group":
                adv = adv / ((_std(group) if G > 1 else 0.0) + 1e-4)
            elif scale == "batch":
                adv = adv / (_std(rewards) + 1e-4)
            out.append(adv)
    if estimator == "reinforce_plus_plus":  # NeMo-RL: expand per token, whiten over valid tokens
        tokens = [(a, 1) for a, n in zip(out, num_tokens) if not math.isnan(a) for _ in range(n)]
        m = sum(a for a, _ in tokens) / len(tokens)
        var = sum((a - m) ** 2 for a, _ in tokens) / len(tokens)
        out = [(a - m) / math.sqrt(max(var, 1e-8)) for a in out]
    return [0.0 if math.isnan(a) else a for a in out]


REWARDS = [1.0, 0.0, 1.0, 0.5,   2.0, 2.0, 2.0, 2.0,   0.0, NAN, 3.0, 1.0,   NAN, NAN, NAN, 4.0]
TOKENS = [3, 5, 1, 4,   2, 2, 7, 1,   6, 3, 2, 5,   1, 1, 1, 8]


@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                             ("rloo", "none"), ("rloo", "group"), ("rloo", "batch"),
                                             ("reinforce_plus_plus", "none")])
def test_group_advantages_match_the_reference(estimator, scale):
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    got = group_advantages(rewards, 4, estimator, scale, num_tokens_B=torch.tensor(TOKENS))
    want = ref_advantages(REWARDS, 4, estimator, scale, TOKENS)
    assert not torch.isnan(got).any()
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_equal_rewards_give_zero_advantage_without_nan():
    rewards = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    for estimator, scale in (("grpo", "group"), ("grpo", "batch"), ("rloo", "group"), ("rloo", "none")):
        adv = group_advantages(rewards, 4, estimator, scale)
        assert torch.equal(adv, torch.zeros(8)), (estimator, scale)
    # one group all equal, the other not: only the equal one is zero
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert adv[:2].tolist() == [0.0, 0.0] and adv[2] < 0 < adv[3]


def test_unscored_completions_are_left_out_and_get_zero_advantage():
    adv = group_advantages(torch.tensor([NAN, 1.0, 0.0, NAN]), 4, "grpo", "group")
    # the baseline is the mean of the scored rewards only, the std theirs too
    assert adv[0] == 0 and adv[3] == 0
    assert adv[1].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4))
    # RLOO: a group with one scorable reward has no leave-one-out baseline: 0
    assert group_advantages(torch.tensor([NAN, 3.0, NAN, NAN]), 4, "rloo").tolist() == [0.0] * 4


def test_estimator_defaults_and_bad_combinations():
    assert tuple(ADVANTAGE_ESTIMATORS) == ("grpo", "rloo", "reinforce_plus_plus")
    assert [default_scale_rewards(e) for e in ADVANTAGE_ESTIMATORS] == ["group", "none", "none"]
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"scale_rewards='group' with advantage_estimator='reinforce_plus_plus'"):
        group_advantages(r, 2, "reinforce_plus_plus", "group", num_tokens_B=torch.ones(4))
    with pytest.raises(ValueError, match="needs num_tokens_B"):
        group_advantages(r, 2, "reinforce_plus_plus")
    with pytest.raises(ValueError, match="advantage_estimator='ppo'"):
        group_advantages(r, 2, "ppo")
    with pytest.raises(ValueError, match="5 rewards cannot be split into groups of num_generations=2"):
        group_advantages(torch.ones(5), 2)


# ---------------------------------------------------------------------------------------------
# Reference: the loss, token by token (TRL 1.16 _compute_loss)
# ---------------------------------------------------------------------------------------------


def ref_token_losses(lp, old, adv, mask, ref, beta, eps, eps_hi, delta, level, bias_kl):
    B, T = len(lp), len(lp[0])
    losses, ratios = [], []
    for b in range(B):
        n = sum(mask[b])
        seq_ratio = math.exp(sum(mask[b][t] * (lp[b][t] - old[b][t]) for t in range(T)) / max(n, 1))
        row, rrow = [], []
        for t in range(T):
            r = math.exp(lp[b][t] - old[b][t]) if level == "token" else seq_ratio
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            clipped = min(max(r, 1 - eps), 1 + eps_hi)
            capped = min(r, delta) if delta is not None else r
            loss = -min(capped * a, clipped * a)
            if beta:
                d = ref[b][t] - lp[b][t]
                kl = math.exp(d) - d - 1
                loss += beta * (kl * r if bias_kl else kl)
            row.append(loss)
            rrow.append(capped)
        losses.append(row)
        ratios.append(rrow)
    return losses, ratios


def ref_aggregate(loss_type, losses, mask, max_completion_length=None):
    B = len(losses)
    total = sum(losses[b][t] * mask[b][t] for b in range(B) for t in range(len(mask[b])))
    tokens = sum(map(sum, mask))
    if loss_type == "grpo":
        return sum(sum(l * m for l, m in zip(losses[b], mask[b])) / max(sum(mask[b]), 1) for b in range(B)) / B
    if loss_type in ("bnpo", "dapo"):  # one batch, no accumulation: the same
        return total / max(tokens, 1)
    return total / (B * max_completion_length)


def _batch(seed=0, B=6, T=5, empty_row=True):
    g = random.Random(seed)
    lp = [[g.uniform(-3, -0.1) for _ in range(T)] for _ in range(B)]
    old = [[x + g.uniform(-0.4, 0.4) for x in row] for row in lp]  # off-policy: ratios outside the clip range
    ref = [[x + g.uniform(-0.5, 0.5) for x in row] for row in lp]
    lengths = [g.randint(1, T) for _ in range(B)]
    if empty_row:
        lengths[2] = 0
    mask = [[1 if t < n else 0 for t in range(T)] for n in lengths]
    adv = [g.uniform(-2, 2) for _ in range(B)]
    return lp, old, ref, mask, adv


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


CASES = [dict(beta=0.0, delta=None), dict(beta=0.04, delta=None), dict(beta=0.04, delta=1.1),
         dict(beta=0.1, delta=None, bias_kl=False), dict(beta=0.0, delta=1.05, eps_hi=0.28)]


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_loss_type_matches_trl_formulas(loss_type, level, case):
    lp, old, ref, mask, adv = _batch()
    beta, delta = case["beta"], case["delta"]
    eps, eps_hi, bias_kl = 0.2, case.get("eps_hi", 0.2), case.get("bias_kl", True)
    losses, _ = ref_token_losses(lp, old, adv, mask, ref, beta, eps, eps_hi, delta, level, bias_kl)
    want = ref_aggregate(loss_type, losses, mask, max_completion_length=8)
    got = policy_loss(loss_type, _t(lp), _t(old), _t(adv), _t(mask), ref_logps_BT=_t(ref) if beta else None,
                      beta=beta, epsilon=eps, epsilon_high=case.get("eps_hi"), delta=delta,
                      importance_sampling_level=level, use_bias_correction_kl=bias_kl,
                      **({"max_completion_length": 8} if loss_type == "dr_grpo" else {}))
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_per_token_advantages_are_accepted():
    lp, old, ref, mask, _ = _batch(1)
    g = random.Random(3)
    adv = [[g.uniform(-1, 1) for _ in row] for row in lp]
    losses, _ = ref_token_losses(lp, old, adv, mask, ref, 0.0, 0.2, 0.2, None, "token", True)
    got = policy_loss("dapo", _t(lp), _t(old), _t(adv), _t(mask))
    assert got.item() == pytest.approx(ref_aggregate("dapo", losses, mask), rel=1e-10)


def test_grpo_averages_over_every_row_including_empty_ones():
    lp, old, _, mask, adv = _batch(2)
    assert sum(mask[2]) == 0
    full = policy_loss("grpo", _t(lp), _t(old), _t(adv), _t(mask))
    non_empty = [b for b in range(len(mask)) if sum(mask[b])]
    dropped = policy_loss("grpo", _t(lp)[non_empty], _t(old)[non_empty], _t(adv)[non_empty], _t(mask)[non_empty])
    assert full.item() == pytest.approx(dropped.item() * len(non_empty) / len(mask), rel=1e-12)


def test_delta_caps_only_where_the_advantage_is_negative():
    lp, old, mask = _t([[0.0, 0.0]]), _t([[-1.0, -1.0]]), _t([[1.0, 1.0]])  # ratio e ≈ 2.72 on both tokens
    for adv, changes in ((1.0, False), (-1.0, True)):
        plain = policy_loss("dapo", lp, old, _t([adv]), mask)
        capped = policy_loss("dapo", lp, old, _t([adv]), mask, delta=1.5)
        assert (plain.item() != capped.item()) is changes
    assert policy_loss("dapo", lp, old, _t([-1.0]), mask, delta=1.5).item() == pytest.approx(1.5)


def test_on_policy_gradient_is_minus_advantage_over_the_token_count():
    lp = _t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]]).requires_grad_()
    mask, adv = _t([[1, 1, 0], [1, 1, 1]]), _t([0.5, -2.0])
    policy_loss("dapo", lp, lp.detach(), adv, mask).backward()
    want = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(lp.grad, want, atol=1e-14)


def test_bias_corrected_kl_changes_the_gradient_even_on_policy():
    lp = _t([[-1.0, -2.0]]).requires_grad_()
    ref, mask, adv = _t([[-1.5, -1.0]]), _t([[1, 1]]), _t([0.0])
    grads = []
    for bias_kl in (True, False):
        lp.grad = None
        policy_loss("dapo", lp, lp.detach(), adv, mask, ref_logps_BT=ref, beta=1.0,
                    use_bias_correction_kl=bias_kl).backward()
        grads.append(lp.grad.clone())
    d = (ref - lp).detach()
    k3, dk3 = torch.exp(d) - d - 1, 1 - torch.exp(d)  # d k3 / d lp
    assert torch.allclose(grads[1], dk3 / 2, atol=1e-14)
    assert torch.allclose(grads[0], (dk3 + k3) / 2, atol=1e-14)  # d/dlp [exp(lp - old) k3] at lp = old


# ---------------------------------------------------------------------------------------------
# Global normalisers: the micro-batches' shares add up to the global-batch loss
# ---------------------------------------------------------------------------------------------

SPLITS = [slice(0, 1), slice(1, 4), slice(4, 6)]  # uneven micro-batches


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batch_shares_sum_to_the_full_batch_loss_and_gradient(loss_type, level):
    lp, old, ref, mask, adv = _batch(4)
    lp_full = _t(lp).requires_grad_()
    params = dict(beta=0.04, importance_sampling_level=level,
                  **({"max_completion_length": 6} if loss_type == "dr_grpo" else {}))
    full = policy_loss(loss_type, lp_full, _t(old), _t(adv), _t(mask), ref_logps_BT=_t(ref), **params)
    full.backward()
    key = policy_loss_count_key(loss_type)
    total_units = sum(num_units(loss_type, _t(mask)[s]) for s in SPLITS)
    lp_parts = _t(lp).requires_grad_()
    shares = [policy_loss(loss_type, lp_parts[s], _t(old)[s], _t(adv)[s], _t(mask)[s], ref_logps_BT=_t(ref)[s],
                          **params, **{key: total_units}) for s in SPLITS]
    sum(shares).backward()
    assert sum(shares).item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(lp_parts.grad, lp_full.grad, atol=1e-14)


def test_bnpo_is_the_mean_of_micro_batch_token_means_as_trl_accumulates():
    lp, old, _, mask, adv = _batch(5)
    shares = [policy_loss("bnpo", _t(lp)[s], _t(old)[s], _t(adv)[s], _t(mask)[s], num_micro_batches=len(SPLITS))
              for s in SPLITS]
    each = [policy_loss("bnpo", _t(lp)[s], _t(old)[s], _t(adv)[s], _t(mask)[s]) for s in SPLITS]
    assert sum(shares).item() == pytest.approx(sum(each).item() / len(SPLITS), rel=1e-12)
    assert [num_units("bnpo", _t(mask)[s]) for s in SPLITS] == [1.0, 1.0, 1.0]


def test_all_truncated_groups_are_masked_out_and_nothing_is_nan():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0,   1.0, 1.0, 0.0, 0.0])
    truncated = torch.tensor([True, True, True, True, False, True, False, False])  # group 0: all truncated
    adv = group_advantages(rewards, 4)
    lp = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    mask = mask_truncated(torch.ones(8, 5, dtype=torch.float64), truncated)
    assert mask[:4].sum() == 0 and mask[5].sum() == 0 and mask[4].sum() == 5
    for loss_type in POLICY_LOSS_TYPES:
        lp.grad = None
        extra = {"max_completion_length": 5} if loss_type == "dr_grpo" else {}
        out = policy_loss_and_metrics(loss_type, lp, lp.detach() + 0.1, adv, mask, **extra)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
        assert lp.grad[truncated].abs().sum() == 0 and lp.grad[~truncated].abs().sum() > 0
    # a batch where everything is truncated: loss exactly 0, no NaN
    empty = mask_truncated(torch.ones(4, 3), torch.ones(4, dtype=torch.bool))
    for loss_type in ("grpo", "bnpo", "dapo"):
        out = policy_loss_and_metrics(loss_type, torch.randn(4, 3), torch.randn(4, 3), torch.randn(4), empty)
        assert out.loss.item() == 0.0 and all(math.isfinite(v) for v in reduce_policy_metrics(out.sums).values())


# ---------------------------------------------------------------------------------------------
# Metric sums
# ---------------------------------------------------------------------------------------------


def ref_metrics(lp, old, adv, mask, ref, level, delta):
    _, ratios = ref_token_losses(lp, old, adv, mask, ref, 0.04, 0.2, 0.2, delta, level, True)
    tokens = [(b, t) for b in range(len(mask)) for t in range(len(mask[b])) if mask[b][t]]
    if level == "sequence":  # one ratio per row, counted over every row (TRL)
        items = [(ratios[b][0], adv[b]) for b in range(len(mask))]
    else:
        items = [(ratios[b][t], adv[b]) for b, t in tokens]
    low = sum(1 for r, a in items if r < 0.8 and a < 0) / len(items)
    high = sum(1 for r, a in items if r > 1.2 and a > 0) / len(items)
    kls = []
    for b, t in tokens:
        d = ref[b][t] - lp[b][t]
        seq = math.exp(sum(mask[b][u] * (lp[b][u] - old[b][u]) for u in range(len(mask[b]))) / max(sum(mask[b]), 1))
        r = math.exp(lp[b][t] - old[b][t]) if level == "token" else seq
        kls.append((math.exp(d) - d - 1) * r)
    return {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high,
            "kl": sum(kls) / len(kls)}


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_metric_sums_reduce_to_trl_metrics_over_micro_batches(level):
    lp, old, ref, mask, adv = _batch(6, B=6, T=6)
    old = [[x + 0.5 * (1 if b % 2 else -1) + 0.3 * (1 if t % 2 else -1) for t, x in enumerate(row)]
           for b, row in enumerate(old)]  # ratios outside the clip range, per token and per row
    want = ref_metrics(lp, old, adv, mask, ref, level, delta=None)
    entropy = torch.rand(6, 6, dtype=torch.float64)
    sums = {}
    for s in SPLITS:
        out = policy_loss_and_metrics("dapo", _t(lp)[s], _t(old)[s], _t(adv)[s], _t(mask)[s], ref_logps_BT=_t(ref)[s],
                                      beta=0.04, importance_sampling_level=level, entropy_BT=entropy[s])
        for k, v in out.sums.items():
            sums[k] = sums.get(k, 0) + v
    got = reduce_policy_metrics(sums)
    assert 0 < want["clip_ratio/region_mean"] < 1
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-10), k
    assert got["entropy"] == pytest.approx((entropy * _t(mask)).sum().item() / sum(map(sum, mask)), rel=1e-12)


def test_no_kl_metric_without_beta():
    lp, old, _, mask, adv = _batch(7)
    out = policy_loss_and_metrics("dapo", _t(lp), _t(old), _t(adv), _t(mask))
    assert "kl_sum" not in out.sums and "kl" not in reduce_policy_metrics(out.sums)


def test_reward_and_completion_metrics():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, NAN, 2.0])
    m = reward_metrics(rewards, 2)
    assert m["reward"] == pytest.approx(1.0) and m["reward_std"] == pytest.approx(_std([1, 1, 0, 1, 2]))
    assert m["frac_reward_zero_std"] == pytest.approx(2 / 6)  # group 0 is all-equal; group 2 has one value (NaN std)
    assert reward_metrics(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2, "batch")["frac_reward_zero_std"] == 1.0
    c = completion_metrics(torch.tensor([3, 10, 5]), torch.tensor([False, True, False]))
    assert c == {"completions/mean_length": 6.0, "completions/min_length": 3.0, "completions/max_length": 10.0,
                 "completions/clipped_ratio": pytest.approx(1 / 3)}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    lp, m, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match=r"loss_type='ppo' is not known; expected one of \['grpo', 'bnpo', 'dr_grpo', 'dapo'\]"):
        policy_loss("ppo", lp, lp, adv, m)
    with pytest.raises(ValueError, match=r"loss_type='grpo' is normalised by num_sequences, not \['num_items'\]"):
        policy_loss("grpo", lp, lp, adv, m, num_items=10)
    with pytest.raises(ValueError, match="loss_type='dr_grpo' needs max_completion_length > 0"):
        policy_loss("dr_grpo", lp, lp, adv, m)
    with pytest.raises(ValueError, match="a completion has 3 tokens, more than max_completion_length=2"):
        policy_loss("dr_grpo", lp, lp, adv, m, max_completion_length=2)
    with pytest.raises(ValueError, match="beta=0.1 needs ref_logps"):
        policy_loss("dapo", lp, lp, adv, m, beta=0.1)
    with pytest.raises(ValueError, match="ref_logps given with beta=0"):
        policy_loss("dapo", lp, lp, adv, m, ref_logps_BT=lp)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\), expected \[B\] = \(2,\) or \[B, T\]"):
        policy_loss("dapo", lp, lp, torch.zeros(3), m)
    with pytest.raises(ValueError, match=r"old_logps has shape \(2, 4\), expected \(2, 3\)"):
        policy_loss("dapo", lp, torch.zeros(2, 4), adv, m)
    with pytest.raises(ValueError, match="importance_sampling_level='seq'"):
        policy_loss("dapo", lp, lp, adv, m, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="delta=0; expected a positive cap"):
        policy_loss("dapo", lp, lp, adv, m, delta=0)


# ---------------------------------------------------------------------------------------------
# Chunked temperature-scaled log-probs and entropy
# ---------------------------------------------------------------------------------------------


def _full(hidden, weight, targets, temperature, cap):
    logits = hidden.double() @ weight.double().T
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature,cap,chunk", [(1.0, None, 4), (0.7, None, 3), (1.3, 5.0, 100)])
def test_chunked_logprobs_and_entropy_equal_the_full_softmax(temperature, cap, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(32, 8, requires_grad=True)
    targets = torch.randint(0, 32, (11,))
    want_lp, want_h = _full(hidden, weight, targets, temperature, cap)
    lp, h = token_logprobs_and_entropy(hidden, weight, targets, temperature, chunk, cap, entropy_grad=True)
    assert lp.dtype == torch.float32 and torch.allclose(lp.double(), want_lp, atol=1e-5)
    assert torch.allclose(h.double(), want_h, atol=1e-5)
    assert torch.allclose(token_logprobs_at_temperature(hidden, weight, targets, temperature, chunk, cap), lp)
    assert torch.allclose(chunked_entropy(hidden, weight, temperature, chunk, cap), h)
    metric_lp, metric_h = token_logprobs_and_entropy(hidden, weight, targets, temperature, chunk, cap)
    assert not metric_h.requires_grad and metric_lp.requires_grad and torch.equal(metric_h, h.detach())
    (lp.sum() + h.sum()).backward()
    grads = [hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    (want_lp.sum() + want_h.sum()).backward()
    assert torch.allclose(grads[0].double(), hidden.grad.double(), atol=1e-4)
    assert torch.allclose(grads[1].double(), weight.grad.double(), atol=1e-4)


def test_chunked_helpers_handle_empty_input_and_reject_bad_settings():
    lp, h = token_logprobs_and_entropy(torch.zeros(0, 4), torch.zeros(6, 4), torch.zeros(0, dtype=torch.long))
    assert lp.shape == h.shape == (0,)
    with pytest.raises(ValueError, match="temperature=0; expected > 0"):
        chunked_entropy(torch.zeros(2, 4), torch.zeros(6, 4), temperature=0)


# ---------------------------------------------------------------------------------------------
# Config section
# ---------------------------------------------------------------------------------------------


def test_grpo_config_defaults_are_trl_and_choices_mirror_the_losses():
    from nemo_aligner.config import grpo

    cfg = grpo.GRPOConfig()
    assert (cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k) == (8, 512, 1.0, 1.0, 0)
    assert (cfg.loss_type, cfg.epsilon, cfg.resolved_epsilon_high, cfg.delta, cfg.beta) == ("dapo", 0.2, 0.2, None, 0.0)
    assert cfg.use_bias_correction_kl and cfg.num_iterations == 1 and not cfg.mask_truncated_completions
    assert cfg.resolved_scale_rewards == "group" and cfg.importance_sampling_level == "token"
    assert grpo.GRPO_LOSS_TYPES == POLICY_LOSS_TYPES and grpo.ADVANTAGE_ESTIMATORS == ADVANTAGE_ESTIMATORS
    assert grpo.SCALE_REWARDS == SCALE_REWARDS and grpo.IMPORTANCE_SAMPLING_LEVELS == tuple(IMPORTANCE_LEVELS)
    assert grpo.DEFAULT_SCALE_REWARDS == {e: default_scale_rewards(e) for e in ADVANTAGE_ESTIMATORS}
    assert grpo.GRPOConfig(advantage_estimator="rloo").resolved_scale_rewards == "none"


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss_type="gspo"), r"model.grpo.loss_type='gspo'; expected one of \['grpo', 'bnpo', 'dr_grpo', 'dapo'\]"),
    (dict(num_generations=1), r"model.grpo.num_generations=1; expected an integer >= 2"),
    (dict(advantage_estimator="reinforce_plus_plus", scale_rewards="group"),
     r"model.grpo.scale_rewards='group' with model.grpo.advantage_estimator=reinforce_plus_plus"),
    (dict(delta=1.0), r"model.grpo.delta=1.0; expected > 1 \(best > 1 \+ epsilon_high = 1.2\)"),
    (dict(epsilon=1.5), r"model.grpo.epsilon=1.5; expected in \[0, 1\)"),
    (dict(temperature=0.0), r"model.grpo.temperature=0.0; expected > 0"),
    (dict(top_p=0.0), r"model.grpo.top_p=0.0; expected in \(0, 1\]"),
    (dict(beta=-0.1), r"model.grpo.beta=-0.1; expected >= 0"),
    (dict(reward_funcs=["a.py:f"], reward_weights=[1.0, 2.0]),
     r"model.grpo.reward_weights has 2 entries, expected 1 \(one per model.grpo.reward_funcs entry\)"),
    (dict(reward_funcs=["a.py:f"], reward_model_path="/rm", reward_weights=[1.0]),
     r"expected 2 \(one per model.grpo.reward_funcs entry, then one for model.grpo.reward_model_path\)"),
    (dict(reward_funcs=[{"fn": "a.py:f", "weight": 2}]), r"model.grpo.reward_funcs\[0\]=.*unknown keys \['weight'\]"),
    (dict(reward_funcs=[""]), r"model.grpo.reward_funcs\[0\] is empty"),
])
def test_grpo_config_errors_name_the_key(kwargs, message):
    from nemo_aligner.config.grpo import GRPOConfig

    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kwargs)


def test_grpo_config_loads_through_omegaconf_with_mapping_specs():
    from omegaconf import OmegaConf

    from nemo_aligner.config.grpo import GRPOConfig

    raw = {"reward_funcs": ["accuracy_last_number", {"fn": "length_penalty", "kwargs": {"max_length": 64,
                                                                                          "cache_length": 16}}],
           "reward_weights": [1.0, 0.5], "loss_type": "dr_grpo"}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GRPOConfig), raw))
    assert cfg.reward_funcs[1] == {"fn": "length_penalty", "kwargs": {"max_length": 64, "cache_length": 16}}
    assert cfg.num_rewards == 2 and cfg.loss_type == "dr_grpo"


def test_chunked_logprobs_and_entropy_hold_a_few_chunks_whatever_the_token_count():
    """Measured with benchmarks/bench_policy_logprob_memory.py (CPU allocations, torch.profiler)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_policy_logprob_memory.py"
    spec = importlib.util.spec_from_file_location("bench_policy_logprob_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for entropy_grad, most in ((True, 8), (False, 4)):  # measured: 6.0 and 3.0 chunks of fp32 logits
        small = bench.logprob_entropy_step_peak(512, 32, 4096, 128, entropy_grad=entropy_grad)
        large = bench.logprob_entropy_step_peak(2048, 32, 4096, 128, entropy_grad=entropy_grad)
        assert small["chunks"] <= most and large["chunks"] <= most
        # 4x the tokens: the full logits would grow by 3 x 512 x vocab floats; the chunked step by < 1/4 chunk
        assert large["activations"] - small["activations"] < small["chunk_logits"] / 4
