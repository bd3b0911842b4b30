"""PPO's rollout targets (algorithms.ppo.rollout_targets) against values derived by hand: the score on the
last real token, the KL term on every real token, missing_eos_penalty, and GAE corners (gamma / lam 0 and 1)
over right-padded rows; plus the value read position (the critic's value of token t is read where the
log-prob of t is)."""

import math
from dataclasses import replace

import pytest
import torch

from nemo_aligner.algorithms.ppo import rollout_targets
from nemo_aligner.config.ppo import PPOConfig

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float32)
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
REF = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -1.0, 0.0]])
VALUES = torch.tensor([[0.2, 0.4, 0.1], [0.5, -0.3, 0.0]])
SCORES = torch.tensor([1.0, 2.0])
EOS = torch.tensor([True, False])


def settings(**kw):
    return replace(PPOConfig(whiten_advantages=False), **kw)


def hand_rewards(kl_coef, kl, scores):
    """r_t = −kl_coef·kl_t on real tokens; + score on the row's last real token (index 2 and 1)."""
    r = [[-kl_coef * kl[0][t] for t in range(3)], [-kl_coef * kl[1][t] for t in range(2)] + [0.0]]
    r[0][2] += scores[0]
    r[1][1] += scores[1]
    return r


def hand_gae(r, v, lengths, gamma, lam):
    adv = [[0.0] * 3 for _ in r]
    for b, n in enumerate(lengths):
        nxt_v, nxt_a = 0.0, 0.0
        for t in reversed(range(n)):
            delta = r[b][t] + gamma * nxt_v - v[b][t]
            adv[b][t] = delta + gamma * lam * nxt_a
            nxt_v, nxt_a = v[b][t], adv[b][t]
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.0, 0.95), (0.9, 0.0), (1.0, 0.0)])
def test_rewards_and_gae_match_hand_derivation(gamma, lam):
    out = rollout_targets(SCORES, LOGPS, REF, VALUES, MASK, EOS, settings(kl_coef=0.1, gamma=gamma, lam=lam))
    kl = (LOGPS - REF).tolist()
    r = hand_rewards(0.1, kl, SCORES.tolist())
    assert torch.allclose(out.rewards_SL, torch.tensor(r), atol=1e-6)
    adv = hand_gae(r, VALUES.tolist(), [3, 2], gamma, lam)
    assert torch.allclose(out.advantages_SL, torch.tensor(adv), atol=1e-6)
    ret = [[adv[b][t] + (VALUES[b, t].item() if MASK[b, t] else 0.0) for t in range(3)] for b in range(2)]
    assert torch.allclose(out.returns_SL, torch.tensor(ret), atol=1e-6)
    assert out.advantages_SL[1, 2] == 0 and out.returns_SL[1, 2] == 0  # padding stays 0


def test_gamma_lam_one_is_monte_carlo_return_minus_value():
    out = rollout_targets(SCORES, LOGPS, REF, VALUES, MASK, EOS, settings(kl_coef=0.0, gamma=1.0, lam=1.0))
    # no KL: the reward is only the score, so every token's return is the row's score
    assert torch.allclose(out.returns_SL, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    assert torch.allclose(out.advantages_SL, out.returns_SL - VALUES * MASK)


def test_missing_eos_penalty_and_objective_sums():
    out = rollout_targets(SCORES, LOGPS, REF, VALUES, MASK, EOS, settings(kl_coef=0.05, missing_eos_penalty=1.5))
    assert out.scores_S.tolist() == [1.0, 0.5]  # the second completion has no EOS
    kl_seq = [sum((LOGPS - REF)[0].tolist()), sum((LOGPS - REF)[1, :2].tolist())]
    s = out.sums
    assert math.isclose(float(s["kl_seq_sum"]), sum(kl_seq), rel_tol=1e-6)
    assert math.isclose(float(s["score_sum"]), 1.5, rel_tol=1e-6)
    assert math.isclose(float(s["non_score_seq_sum"]), -0.05 * sum(kl_seq), rel_tol=1e-5)
    assert math.isclose(float(s["rlhf_reward_sum"]), 1.5 - 0.05 * sum(kl_seq), rel_tol=1e-5)
    assert math.isclose(float(s["neg_logp_seq_sum"]), 3.5 + 1.5, rel_tol=1e-6)


def test_k3_and_absolute_kl():
    k3 = rollout_targets(SCORES, LOGPS, REF, VALUES, MASK, EOS, settings(kl_coef=1.0, kl_estimator="k3"))
    d = (REF - LOGPS)
    expected = (torch.exp(d) - 1 - d) * MASK
    assert torch.allclose(-k3.rewards_SL[0, :2], expected[0, :2], atol=1e-6)  # tokens without the score
    absolute = rollout_targets(SCORES, LOGPS, REF, VALUES, MASK, EOS, settings(kl_coef=1.0, use_absolute_kl=True))
    assert torch.allclose(-absolute.rewards_SL[0, :2], (LOGPS - REF).abs()[0, :2])
    assert absolute.rewards_SL[0, 1] < 0 and (LOGPS - REF)[0, 1] < 0  # |k1| penalises a negative k1 too


def test_no_reference_means_no_kl():
    out = rollout_targets(SCORES, LOGPS, None, VALUES, MASK, EOS, settings(kl_coef=0.05))
    assert float(out.sums["kl_seq_sum"]) == 0.0
    assert torch.equal(out.rewards_SL, torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]))


def test_whitened_advantages_have_zero_mean_unit_variance_over_real_tokens():
    out = rollout_targets(SCORES, LOGPS, REF, VALUES, MASK, EOS, PPOConfig())
    real = out.advantages_SL[MASK.bool()]
    assert abs(real.mean().item()) < 1e-6 and abs(real.var().item() - 1.0) < 1e-4
    assert out.advantages_SL[1, 2] == 0


# ------------------------------------------------------------------------------------------ the losses' wiring
def _rollout():
    import numpy as np

    from nemo_aligner.rollout import RolloutDataset, RolloutExample

    rng = np.random.default_rng(0)
    examples = []
    for i, (p, c) in enumerate([(3, 4), (2, 2), (4, 3)]):
        e = RolloutExample(np.arange(1, p + 1), np.arange(10, 10 + c), "", "", {}, i, 0, False,
                           np.zeros(c, np.float32))
        e.old_logps = rng.normal(size=c).astype(np.float32) - 2
        e.extra = {k: rng.normal(size=c).astype(np.float32) for k in ("advantages", "returns", "values")}
        examples.append(e)
    return RolloutDataset(examples)


@pytest.mark.parametrize("packed", [False, True])
def test_actor_and_critic_losses_read_each_completions_own_targets(packed):
    """The micro-batch losses equal losses.ppo's functions on per-completion tensors assembled by hand, in any
    item order, padded or packed (the per-token targets follow each completion, not its row)."""
    from nemo_aligner.algorithms.ppo import CriticLoss, PPOAlgorithm, PPOSettings
    from nemo_aligner.losses.ppo import clipped_policy_terms, clipped_value_terms

    cfg = PPOConfig(entropy_bonus=0.01)
    settings = PPOSettings(**{k: getattr(cfg, k) for k in ("num_ppo_epochs", "num_mini_batches", "kl_coef",
                           "kl_estimator", "use_absolute_kl", "missing_eos_penalty", "whiten_rewards", "gamma", "lam",
                           "whiten_advantages", "cliprange", "cliprange_value", "vf_coef", "entropy_bonus",
                           "temperature")}, max_new_tokens=8, top_k=0, top_p=1.0, end_strings=[])
    algorithm = PPOAlgorithm(settings, pad_id=0, seed=1, num_rollout_samples=3, forward_micro_batch_size=3,
                             packed=packed)
    dataset = _rollout()
    items = [2, 0, 1]
    batch = algorithm.make_batch(dataset, items, packed)
    torch.manual_seed(0)
    outputs_RT2 = torch.randn(*batch.labels.shape, 2)
    num_tokens = 20  # the global mini-batch's tokens
    loss, sums = algorithm.loss(batch, outputs_RT2, num_tokens)
    scores_RT = torch.randn(*batch.labels.shape)
    vloss, vsums = CriticLoss(settings).loss(batch, scores_RT, num_tokens)
    # by hand: each completion's positions in its row (labels scored), in the batch's sequence order
    want_pg, want_vf, entropy = 0.0, 0.0, 0.0
    for s, i in enumerate(batch.example_indices.tolist()):
        e = dataset.examples[i]
        rows, cols = (batch.seq_index == s).nonzero(as_tuple=True)
        logps, ent, values = outputs_RT2[rows, cols, 0], outputs_RT2[rows, cols, 1], scores_RT[rows, cols]
        one = torch.ones(1, len(cols))
        pg, _ = clipped_policy_terms(logps[None], torch.from_numpy(e.old_logps)[None],
                                     torch.from_numpy(e.extra["advantages"])[None], one, settings.cliprange)
        vf, _ = clipped_value_terms(values[None], torch.from_numpy(e.extra["values"])[None],
                                    torch.from_numpy(e.extra["returns"])[None], one, settings.cliprange_value)
        want_pg, want_vf, entropy = want_pg + pg, want_vf + vf, entropy + ent.sum()
    assert sorted(batch.example_indices.tolist()) == [0, 1, 2]
    assert torch.allclose(loss, (want_pg - 0.01 * entropy) / num_tokens, atol=1e-6)
    assert torch.allclose(vloss, settings.vf_coef * want_vf / num_tokens, atol=1e-6)
    assert float(sums["tokens"]) == 9 and algorithm.num_units(batch) == 9
