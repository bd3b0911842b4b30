"""PPO maths against hand-derived values: KL estimators, the per-token reward, GAE (last token, masks,
gamma / lam corner cases), masked whitening, the clipped policy and value losses and TRL's metrics."""

import math

import pytest
import torch

from nemo_aligner.losses import (
    apply_missing_eos_penalty,
    gae,
    kl_estimate,
    masked_var,
    masked_whiten,
    ppo_loss,
    reduce_ppo_metrics,
    token_rewards,
    whiten_advantages,
    whiten_rewards,
)
from nemo_aligner.losses.ppo import (
    KL_ESTIMATORS,
    clipped_policy_terms,
    clipped_value_terms,
    last_token_index,
    rollout_metric_sums,
)

torch.set_num_threads(1)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# KL and the per-token reward
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    lp, ref = _t([[-1.0, -2.0]]), _t([[-1.5, -1.0]])
    assert kl_estimate(lp, ref, "k1").tolist() == [[0.5, -1.0]]
    assert kl_estimate(lp, ref, "k1", absolute=True).tolist() == [[0.5, 1.0]]
    k3 = kl_estimate(lp, ref, "k3")[0].tolist()
    assert k3 == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0], rel=1e-12)
    assert KL_ESTIMATORS.keys() == {"k1", "k3"}
    with pytest.raises(ValueError, match=r"kl_estimator='k2'; expected one of \['k1', 'k3'\]"):
        kl_estimate(lp, ref, "k2")


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = _t([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [1.0, 1.0, 1.0, 1.0]])
    mask = _t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    rewards, non_score = token_rewards(_t([2.0, -1.0, 5.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(non_score, _t([[-0.05, -0.1, -0.15, 0.0], [-0.25, -0.3, -0.35, -0.4],
                                         [-0.5, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, _t([[-0.05, -0.1, 1.85, 0.0], [-0.25, -0.3, -0.35, -1.4], [4.5, 0.0, 0.0, 0.0]]))
    assert last_token_index(_t([[1, 0, 1, 0]])).tolist() == [2]  # holes: the last set position
    with pytest.raises(ValueError, match="row 1 has no completion token to put its score on"):
        token_rewards(_t([1.0, 1.0]), torch.zeros(2, 3, dtype=torch.float64), _t([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_missing_eos_penalty_subtracts_from_completions_without_eos():
    scores = _t([1.0, 2.0, 3.0])
    assert apply_missing_eos_penalty(scores, torch.tensor([True, False, True]), 1.5).tolist() == [1.0, 0.5, 3.0]
    assert apply_missing_eos_penalty(scores, torch.tensor([False, False, False]), None).tolist() == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def test_gae_by_hand_on_one_row():
    r, v = [0.1, -0.2, 1.0], [0.5, 0.4, 0.3]
    g, l = 0.9, 0.8
    d2 = 1.0 + g * 0 - 0.3  # last token: no next value
    d1 = -0.2 + g * 0.3 - 0.4
    d0 = 0.1 + g * 0.4 - 0.5
    a2, a1 = d2, d1 + g * l * d2
    a0 = d0 + g * l * a1
    adv, ret = gae(_t([r]), _t([v]), _t([[1, 1, 1]]), g, l)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2], rel=1e-12)
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3], rel=1e-12)


def test_gae_corner_cases_of_gamma_and_lam():
    r, v, m = _t([[0.5, 0.0, 2.0, -1.0]]), _t([[0.3, 0.7, -0.2, 0.9]]), _t([[1, 1, 1, 1]])
    # lam = 1, gamma = 1: returns are the Monte-Carlo sums of future rewards, A = G - V
    adv, ret = gae(r, v, m, 1.0, 1.0)
    assert ret[0].tolist() == pytest.approx([1.5, 1.0, 1.0, -1.0])
    assert adv[0].tolist() == pytest.approx([1.5 - 0.3, 1.0 - 0.7, 1.0 + 0.2, -1.0 - 0.9])
    # lam = 0: one-step TD errors
    adv, _ = gae(r, v, m, 0.9, 0.0)
    assert adv[0].tolist() == pytest.approx([0.5 + 0.9 * 0.7 - 0.3, 0.0 + 0.9 * -0.2 - 0.7, 2.0 + 0.9 * 0.9 + 0.2,
                                             -1.0 - 0.9])
    # gamma = 0: A = r - V, whatever lam
    adv, ret = gae(r, v, m, 0.0, 0.95)
    assert adv[0].tolist() == pytest.approx((r - v)[0].tolist()) and ret[0].tolist() == pytest.approx(r[0].tolist())


def trl_gae(rewards, values, mask, gamma, lam):
    """TRL's PPO recursion: padded values and rewards zeroed, next value of the last column 0."""
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    last, out = 0.0, []
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def test_gae_matches_trl_on_right_padded_rows():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    mask = _t([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    want_adv, want_ret = trl_gae(rewards, values, mask, 1.0, 0.95)
    assert torch.allclose(adv, want_adv * mask, atol=1e-12) and torch.allclose(ret, want_ret * mask, atol=1e-12)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_bootstraps_across_holes_in_the_mask():
    r, v = _t([[1.0, 9.0, 2.0]]), _t([[0.5, 9.0, 0.25]])
    adv, _ = gae(r, v, _t([[1, 0, 1]]), 0.5, 0.5)
    dense, _ = gae(_t([[1.0, 2.0]]), _t([[0.5, 0.25]]), _t([[1, 1]]), 0.5, 0.5)
    assert adv[0].tolist() == pytest.approx([dense[0, 0].item(), 0.0, dense[0, 1].item()])


def test_gae_rejects_bad_settings():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"gamma=1.5, lam=0.95; expected both in \[0, 1\]"):
        gae(x, x, x, 1.5, 0.95)
    with pytest.raises(ValueError, match="must have the same"):
        gae(x, torch.zeros(1, 3), x, 1.0, 0.95)


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------


def test_masked_whiten_uses_masked_unbiased_statistics():
    values, mask = _t([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]]), _t([[1, 1, 0], [1, 0, 1]])
    real = [1.0, 2.0, 3.0, 4.0]
    mean, var = 2.5, sum((x - 2.5) ** 2 for x in real) / 3
    assert masked_var(values, mask).item() == pytest.approx(var)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(var * 3 / 4)
    w = masked_whiten(values, mask)
    assert w[mask.bool()].tolist() == pytest.approx([(x - mean) / math.sqrt(var + 1e-8) for x in real])
    kept = masked_whiten(values, mask, shift_mean=False)
    assert kept[mask.bool()].tolist() == pytest.approx([(x - mean) / math.sqrt(var + 1e-8) + mean for x in real])
    assert (whiten_advantages(values, mask)[mask == 0] == 0).all() and (whiten_rewards(values, mask)[mask == 0] == 0).all()
    with pytest.raises(ValueError, match=r"masked variance over 1 token\(s\); expected at least 2"):
        masked_whiten(values, _t([[1, 0, 0], [0, 0, 0]]))


# ---------------------------------------------------------------------------------------------
# Clipped losses
# ---------------------------------------------------------------------------------------------


def test_clipped_policy_loss_by_hand():
    # ratios e^0.5 ≈ 1.65 (above 1.2), e^-0.5 ≈ 0.61 (below 0.8), e^0.1 ≈ 1.105 (inside), and a padded token
    lp, old = _t([[0.5, -0.5, 0.1, 3.0]]), _t([[0.0, 0.0, 0.0, 0.0]])
    adv, mask = _t([[1.0, 1.0, -2.0, 7.0]]), _t([[1, 1, 1, 0]])
    total, sums = clipped_policy_terms(lp, old, adv, mask, 0.2)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1)]
    want = [max(-1 * r[0], -1 * 1.2), max(-1 * r[1], -1 * 0.8), max(2 * r[2], 2 * r[2])]
    assert want == pytest.approx([-1.2, -r[1], 2 * r[2]])
    assert total.item() == pytest.approx(sum(want))
    assert sums["pg_clip_sum"].item() == 1  # only the first token's clipped term wins
    assert sums["approxkl_sum"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.01))
    assert sums["ratio_sum"].item() == pytest.approx(sum(r))


def test_clipped_value_loss_by_hand():
    values, old, returns = _t([[1.0, 0.0, 2.0]]), _t([[0.5, 0.1, 2.0]]), _t([[2.0, 1.0, 0.0]])
    total, sums = clipped_value_terms(values, old, returns, _t([[1, 1, 1]]), 0.2)
    # token 0: V=1 clipped to 0.7: max(1, 1.69) = 1.69; token 1: V=0 inside [-0.1, 0.3]: 1; token 2: 4
    assert total.item() == pytest.approx(0.5 * (1.69 + 1.0 + 4.0))
    assert sums["vf_clip_sum"].item() == 1


def test_ppo_loss_micro_batch_shares_sum_to_the_full_batch_and_metrics_reduce():
    torch.manual_seed(1)
    B, T = 5, 4
    lp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = lp.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv, mask = torch.randn(B, T, dtype=torch.float64), _t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0],
                                                           [1, 1, 1, 0], [1, 1, 1, 1]])
    values = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old_v, ret = values.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    ent = torch.rand(B, T, dtype=torch.float64)
    kw = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01)
    full = ppo_loss(lp, old, adv, mask, values_BT=values, old_values_BT=old_v, returns_BT=ret, entropy_BT=ent, **kw)
    # by hand, token by token
    want = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = math.exp(lp[b, t].item() - old[b, t].item())
                a = adv[b, t].item()
                pg = max(-a * r, -a * min(max(r, 0.8), 1.2))
                v, ov, R = values[b, t].item(), old_v[b, t].item(), ret[b, t].item()
                vf = 0.5 * max((v - R) ** 2, (min(max(v, ov - 0.2), ov + 0.2) - R) ** 2)
                want += pg + 0.1 * vf - 0.01 * ent[b, t].item()
    assert full.loss.item() == pytest.approx(want / mask.sum().item(), rel=1e-10)
    parts = [slice(0, 2), slice(2, 5)]
    shares = [ppo_loss(lp[s], old[s], adv[s], mask[s], values_BT=values[s], old_values_BT=old_v[s], returns_BT=ret[s],
                       entropy_BT=ent[s], num_items=mask.sum().item(), **kw) for s in parts]
    assert sum(s.loss for s in shares).item() == pytest.approx(full.loss.item(), rel=1e-12)
    summed = {k: sum(s.sums[k] for s in shares) for k in shares[0].sums}
    got, want_m = reduce_ppo_metrics(summed), reduce_ppo_metrics(full.sums)
    assert got.keys() == want_m.keys() >= {"policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                                           "loss/value_avg", "val/clipfrac_avg", "policy/entropy_avg", "val/ratio",
                                           "val/ratio_var"}
    for k in got:
        assert got[k] == pytest.approx(want_m[k], rel=1e-10), k
    ratios = torch.exp(lp - old).detach()[mask.bool()]
    assert got["val/ratio"] == pytest.approx(ratios.mean().item())
    assert got["val/ratio_var"] == pytest.approx(ratios.var(unbiased=False).item(), rel=1e-8)


def test_ppo_loss_argument_errors():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="values_BT needs old_values_BT and returns_BT"):
        ppo_loss(x, x, x, m, values_BT=x)
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs entropy_BT"):
        ppo_loss(x, x, x, m, entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"advantages_BT has shape \(2, 4\), expected \(2, 3\)"):
        ppo_loss(x, x, torch.zeros(2, 4), m)


def test_rollout_metrics_have_trl_names_and_values():
    scores, kl = _t([1.0, 3.0]), _t([[0.1, 0.2, 9.0], [0.3, 0.0, 0.0]])
    mask, logps = _t([[1, 1, 0], [1, 0, 0]]), _t([[-1.0, -2.0, -5.0], [-0.5, -5.0, -5.0]])
    _, non_score = token_rewards(scores, kl, mask, 0.5)
    m = reduce_ppo_metrics(rollout_metric_sums(scores, kl, non_score, logps, mask))
    assert m["objective/kl"] == pytest.approx((0.3 + 0.3) / 2)
    assert m["objective/entropy"] == pytest.approx((3.0 + 0.5) / 2)
    assert m["objective/non_score_reward"] == pytest.approx(-0.5 * 0.6 / 2)
    assert m["objective/scores"] == pytest.approx(2.0)
    assert m["objective/rlhf_reward"] == pytest.approx(2.0 - 0.15)


# ---------------------------------------------------------------------------------------------
# Config section
# ---------------------------------------------------------------------------------------------


def test_ppo_config_defaults_are_trl_and_errors_name_the_key():
    from nemo_aligner.config import ppo

    cfg = ppo.PPOConfig()
    assert (cfg.num_ppo_epochs, cfg.kl_coef, cfg.kl_estimator, cfg.cliprange, cfg.vf_coef, cfg.cliprange_value,
            cfg.gamma, cfg.lam, cfg.temperature) == (4, 0.05, "k1", 0.2, 0.1, 0.2, 1.0, 0.95, 0.7)
    assert cfg.missing_eos_penalty is None and not cfg.whiten_rewards and cfg.whiten_advantages
    assert ppo.KL_ESTIMATORS == tuple(KL_ESTIMATORS)
    for kwargs, message in ((dict(kl_estimator="k2"), r"model.ppo.kl_estimator='k2'; expected one of \['k1', 'k3'\]"),
                            (dict(kl_estimator="k3", use_absolute_kl=True), "k3 is never negative"),
                            (dict(lam=1.5), r"model.ppo.lam=1.5; expected in \[0, 1\]"),
                            (dict(num_ppo_epochs=0), "model.ppo.num_ppo_epochs=0; expected an integer >= 1"),
                            (dict(vf_coef=-1.0), "model.ppo.vf_coef=-1.0; expected >= 0"),
                            (dict(cliprange=1.0), "model.ppo.cliprange=1.0; expected < 1"),
                            (dict(temperature=0.0), "model.ppo.temperature=0.0; expected > 0")):
        with pytest.raises(ValueError, match=message):
            ppo.PPOConfig(**kwargs)
