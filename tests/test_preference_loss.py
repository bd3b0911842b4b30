"""Preference losses against independent scalar implementations written with plain `math`."""

import math

import pytest
import torch

from nemo_aligner.losses.preference import (
    LOSS_TYPES,
    REFERENCE_FREE_LOSSES,
    combined_preference_loss,
    preference_loss,
    preference_metrics,
    sft_loss_from_logps,
)

# ---------------------------------------------------------------------------------------------
# Scalar reference implementations (one pair at a time, nothing from the module under test)
# ---------------------------------------------------------------------------------------------


def logsig(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sig(z):
    return math.exp(logsig(z))


def smoothed(z, eps):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def bern_kl(a, b):  # KL(Bern(sig(a)) || Bern(sig(b)))
    return sig(a) * (logsig(a) - logsig(b)) + sig(-a) * (logsig(-a) - logsig(-b))


def exo(x):
    eps = x["eps"] or 1e-3
    zc, zr = x["b"] * x["dc"], x["b"] * x["dr"]
    top = max(zc, zr)
    qc, qr = math.exp(zc - top), math.exp(zr - top)
    pc, pr = qc / (qc + qr), qr / (qc + qr)
    log_pc, log_pr = zc - top - math.log(qc + qr), zr - top - math.log(qc + qr)
    return pc * (log_pc - math.log(1 - eps)) + pr * (log_pr - math.log(eps))


def discopop(x, tau=0.05):
    z = x["b"] * x["h"]
    m = sig(z / tau)
    return (1 - m) * -logsig(z) + (m * math.exp(-z) if m > 0 else 0.0)


def simpo(x, simpo_gamma=None, gamma_beta_ratio=None):
    gamma = gamma_beta_ratio * x["b"] if gamma_beta_ratio is not None else (
        0.5 if simpo_gamma is None else simpo_gamma)
    return smoothed(x["b"] * (x["tok_pc"] - x["tok_pr"]) - gamma, x["eps"])


def orpo(x, orpo_lambda=None):
    lam = x["b"] if orpo_lambda is None else orpo_lambda
    a_c, a_r = x["tok_pc"], x["tok_pr"]
    log_odds = (a_c - a_r) - (math.log(-math.expm1(a_c)) - math.log(-math.expm1(a_r)))
    return -lam * logsig(log_odds)


SCALAR = {
    "dpo": lambda x: smoothed(x["b"] * x["h"], x["eps"]),
    "sigmoid": lambda x: smoothed(x["b"] * x["h"], x["eps"]),
    "ipo": lambda x: (x["h"] - 1 / (2 * x["b"])) ** 2,
    "rpo_sq": lambda x: (x["b"] * x["h"] - x["g"]) ** 2,
    "rpo_bwd_kl": lambda x: bern_kl(x["g"], x["b"] * x["h"]),
    "rpo_fwd_kl": lambda x: bern_kl(x["b"] * x["h"], x["g"]),
    "hinge": lambda x: max(0.0, 1 - x["b"] * x["h"]),
    "robust": lambda x: (-(1 - x["eps"]) * logsig(x["b"] * x["h"]) + x["eps"] * logsig(-x["b"] * x["h"]))
    / (1 - 2 * x["eps"]),
    "exo_pair": exo,
    "nca_pair": lambda x: -logsig(x["b"] * x["dc"]) - 0.5 * logsig(-x["b"] * x["dc"]) - 0.5 * logsig(-x["b"] * x["dr"]),
    "bco_pair": lambda x: -logsig(x["b"] * x["dc"]) - logsig(-x["b"] * x["dr"]),
    "sppo_hard": lambda x: (x["dc"] - 0.5 / x["b"]) ** 2 + (x["dr"] + 0.5 / x["b"]) ** 2,
    "apo_zero": lambda x: (1 - sig(x["b"] * x["dc"])) + sig(x["b"] * x["dr"]),
    "apo_down": lambda x: sig(x["b"] * x["dc"]) + (1 - sig(x["b"] * x["h"])),
    "discopop": discopop,
    "sigmoid_norm": lambda x: -logsig(x["b"] * (x["tok_dc"] - x["tok_dr"])),
    "sft": lambda x: -x["pc"],
    "simpo": simpo,
    "orpo": orpo,
}
BATCH_SCALAR = {"aot", "aot_unpaired"}  # need the whole batch (sorting)


def pair_inputs(raw, i, beta, eps, avg, scale=1.0):
    """Per-pair scalar quantities; `tok_*` always come from the raw sums / length."""
    lc, lr = max(raw["lc"][i], 1), max(raw["lr"][i], 1)
    pc, pr, rc, rr = (raw[k][i] for k in ("pc", "pr", "rc", "rr"))
    tok = dict(tok_pc=pc / lc, tok_pr=pr / lr, tok_dc=(pc - rc) / lc, tok_dr=(pr - rr) / lr)
    if avg:
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    dc, dr = pc - rc, pr - rr
    g = scale * (raw["Rc"][i] - raw["Rr"][i])
    return dict(pc=pc, pr=pr, dc=dc, dr=dr, h=dc - dr, b=beta, eps=eps, g=g, **tok)


def expected(name, raw, beta, eps=0.0, avg=False, scale=1.0, **extra):
    n = len(raw["pc"])
    xs = [pair_inputs(raw, i, beta, eps, avg, scale) for i in range(n)]
    if name in BATCH_SCALAR:
        if name == "aot":
            a = sorted(x["pc"] - x["pr"] for x in xs)
            b = sorted((x["pc"] - x["dc"]) - (x["pr"] - x["dr"]) for x in xs)
        else:
            a, b = sorted(x["dc"] for x in xs), sorted(x["dr"] for x in xs)
        return [smoothed(beta * (u - v), eps) for u, v in zip(a, b)]
    return [SCALAR[name](x, **extra) for x in xs]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

BASIC = dict(pc=[-1.0, -7.5, -3.2], pr=[-2.4, -4.1, -3.0], rc=[-1.3, -6.0, -3.5], rr=[-2.0, -5.2, -2.2],
             Rc=[1.0, 0.3, 2.0], Rr=[0.0, 0.8, -1.0], lc=[2, 5, 1], lr=[3, 4, 0])
EQUAL = dict(pc=[-2.0, -5.0, -0.7], pr=[-2.0, -5.0, -0.7], rc=[-2.0, -5.0, -0.7], rr=[-2.0, -5.0, -0.7],
             Rc=[0.5, 0.5, 0.5], Rr=[0.5, 0.5, 0.5], lc=[3, 2, 1], lr=[3, 2, 1])
# beta = 0.5 and |h| = 100: |beta h| = 50.
LARGE = dict(pc=[-0.5, -120.0, -60.0], pr=[-100.5, -20.0, -160.0], rc=[-10.0, -10.0, -10.0],
             rr=[-10.0, -10.0, -10.0], Rc=[30.0, -40.0, 1.0], Rr=[0.0, 0.0, 0.0], lc=[1, 1, 1], lr=[1, 1, 1])


def tensors(raw, dtype=torch.float64, requires_grad=False):
    def t(k):
        return torch.tensor(raw[k], dtype=dtype, requires_grad=requires_grad)

    return dict(policy_chosen_logps=t("pc"), policy_rejected_logps=t("pr"), ref_chosen_logps=t("rc"),
                ref_rejected_logps=t("rr"), chosen_rewards=torch.tensor(raw["Rc"], dtype=dtype),
                rejected_rewards=torch.tensor(raw["Rr"], dtype=dtype),
                chosen_lengths=torch.tensor(raw["lc"]), rejected_lengths=torch.tensor(raw["lr"]))


def call(name, raw, dtype=torch.float64, **kwargs):
    t = tensors(raw, dtype)
    return preference_loss(name, t.pop("policy_chosen_logps"), t.pop("policy_rejected_logps"),
                           t.pop("ref_chosen_logps"), t.pop("ref_rejected_logps"), **t, **kwargs)


def assert_matches(got, want, rel=1e-9, abs_=1e-12):
    assert torch.isfinite(got).all(), got
    assert got.tolist() == pytest.approx(want, rel=rel, abs=abs_)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def test_scalar_table_covers_every_loss():
    assert set(SCALAR) | BATCH_SCALAR == set(LOSS_TYPES)
    assert REFERENCE_FREE_LOSSES == {"simpo", "orpo", "sft"}


CASES = {
    "basic": (BASIC, 0.5),
    "equal_logps": (EQUAL, 0.5),
    "large_margin": (LARGE, 0.5),
    "beta_near_zero": (BASIC, 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", LOSS_TYPES)
def test_loss_matches_scalar(name, case):
    raw, beta = CASES[case]
    got = call(name, raw, beta=beta)
    assert got.shape == (3,) and got.dtype == torch.float64
    assert_matches(got, expected(name, raw, beta))


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_loss_with_average_log_probs(name):
    got = call(name, BASIC, beta=0.7, average_log_probs=True, gt_reward_scale=2.0)
    assert_matches(got, expected(name, BASIC, 0.7, avg=True, scale=2.0))


@pytest.mark.parametrize("name,eps", [("dpo", 0.0), ("dpo", 0.5), ("sigmoid", 0.2), ("robust", 0.1),
                                      ("exo_pair", 0.0), ("exo_pair", 0.2), ("simpo", 0.3), ("aot", 0.1),
                                      ("aot_unpaired", 0.5)])
def test_label_smoothing(name, eps):
    assert_matches(call(name, BASIC, beta=0.5, label_smoothing=eps), expected(name, BASIC, 0.5, eps=eps))


def test_dpo_at_zero_margin_is_log2_and_half_smoothing_is_symmetric():
    assert_matches(call("dpo", EQUAL, beta=0.3), [math.log(2)] * 3)
    smoothed_half = call("dpo", BASIC, beta=0.5, label_smoothing=0.5)
    swapped = dict(BASIC, pc=BASIC["pr"], pr=BASIC["pc"], rc=BASIC["rr"], rr=BASIC["rc"])
    assert torch.allclose(smoothed_half, call("dpo", swapped, beta=0.5, label_smoothing=0.5))


def test_exo_pair_zero_smoothing_uses_small_epsilon():
    assert_matches(call("exo_pair", BASIC, beta=0.5), expected("exo_pair", dict(BASIC), 0.5, eps=1e-3))


@pytest.mark.parametrize("extra", [{"simpo_gamma": 1.5}, {"gamma_beta_ratio": 0.25}])
def test_simpo_gamma(extra):
    assert_matches(call("simpo", BASIC, beta=2.0, **extra), expected("simpo", BASIC, 2.0, **extra))


def test_orpo_lambda_and_discopop_tau():
    assert_matches(call("orpo", BASIC, beta=0.5, orpo_lambda=0.1), expected("orpo", BASIC, 0.5, orpo_lambda=0.1))
    assert_matches(call("discopop", BASIC, beta=3.0, discopop_tau=0.5), expected("discopop", BASIC, 3.0, tau=0.5))


def test_aot_output_is_sorted_not_input_order():
    pol = [a - b for a, b in zip(BASIC["pc"], BASIC["pr"])]
    ref = [a - b for a, b in zip(BASIC["rc"], BASIC["rr"])]
    assert sorted(range(3), key=pol.__getitem__) != [0, 1, 2] != sorted(range(3), key=ref.__getitem__)
    got = call("aot", BASIC, beta=1.0)
    unsorted = [smoothed(p - r, 0.0) for p, r in zip(pol, ref)]
    assert_matches(got, expected("aot", BASIC, 1.0))
    assert got.tolist() != pytest.approx(unsorted)


def test_reference_free_losses_ignore_or_accept_missing_reference():
    t = tensors(BASIC)
    for name in sorted(REFERENCE_FREE_LOSSES):
        with_ref = call(name, BASIC, beta=0.5)
        without = preference_loss(name, t["policy_chosen_logps"], t["policy_rejected_logps"], None, None, beta=0.5,
                                  chosen_lengths=t["chosen_lengths"], rejected_lengths=t["rejected_lengths"])
        assert torch.equal(with_ref, without)


def test_sigmoid_norm_does_not_divide_twice_with_average_log_probs():
    assert torch.allclose(call("sigmoid_norm", BASIC, beta=0.5, average_log_probs=True),
                          call("sigmoid_norm", BASIC, beta=0.5))


def test_float32_in_float32_out():
    assert call("dpo", BASIC, dtype=torch.float32, beta=0.5).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

# |beta h| = 100 in float32: naive exp(-z) or sigmoid products would overflow here.
HUGE = dict(LARGE, pc=[-0.5, -220.0, -60.0], pr=[-200.5, -20.0, -260.0])
NEAR_ZERO = dict(BASIC, pc=[0.0, -1e-6, -2.0], pr=[-1e-7, 0.0, -1e-3], lc=[1, 1, 1], lr=[1, 1, 1])


@pytest.mark.parametrize("raw", [BASIC, HUGE, NEAR_ZERO, EQUAL], ids=["basic", "huge", "near_zero", "equal"])
@pytest.mark.parametrize("name", LOSS_TYPES)
def test_gradients_finite(name, raw):
    t = tensors(raw, torch.float32, requires_grad=True)
    inputs = [t.pop(k) for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                 "ref_rejected_logps")]
    loss = preference_loss(name, *inputs, **t, beta=1.0)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert inputs[0].grad is not None  # every loss depends on the policy's chosen log-probs
    for x in inputs:
        assert x.grad is None or torch.isfinite(x.grad).all(), (name, x.grad)


def test_orpo_gradient_at_zero_log_prob_is_finite_with_averaging():
    pc = torch.tensor([0.0, -0.0], requires_grad=True)
    pr = torch.tensor([-3.0, 0.0], requires_grad=True)
    loss = preference_loss("orpo", pc, pr, None, None, beta=0.2, chosen_lengths=torch.tensor([4, 1]),
                           rejected_lengths=torch.tensor([2, 1]), average_log_probs=True)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


P = dict(policy_chosen_logps=_t(-1.0, -2.0), policy_rejected_logps=_t(-2.0, -1.0))
R = dict(ref_chosen_logps=_t(-1.5, -1.5), ref_rejected_logps=_t(-1.5, -1.5))
L = dict(chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([1, 4]))


@pytest.mark.parametrize("loss_type,kwargs,match", [
    ("dpoo", dict(**R), r"loss_type='dpoo'.*\['aot', 'aot_unpaired', 'apo_down'"),
    ("robust", dict(**R, label_smoothing=0.5), r"'robust' needs label_smoothing in \[0, 0\.5\), got 0\.5"),
    ("dpo", dict(**R, label_smoothing=0.6), r"label_smoothing in \[0, 0\.5\], got 0\.6"),
    ("dpo", dict(**R, beta=0.0), r"beta must be > 0, got 0\.0"),
    ("dpo", dict(**R, beta=-1.0), r"beta must be > 0, got -1\.0"),
    ("dpo", dict(ref_chosen_logps=None, ref_rejected_logps=None), r"'dpo' needs ref_chosen_logps.*got None"),
    ("rpo_sq", dict(**R), r"'rpo_sq' needs chosen_rewards and rejected_rewards, got None"),
    ("dpo", dict(**R, average_log_probs=True), r"average_log_probs=True needs chosen_lengths"),
    ("simpo", dict(ref_chosen_logps=None, ref_rejected_logps=None), r"'simpo' needs chosen_lengths"),
    ("simpo", dict(ref_chosen_logps=None, ref_rejected_logps=None, **L, simpo_gamma=1.0, gamma_beta_ratio=0.5),
     r"simpo_gamma or gamma_beta_ratio, not both"),
    ("ipo", dict(**R, label_smoothing=0.1), r"label_smoothing=0\.1 is not used by loss_type='ipo'"),
    ("dpo", dict(**R, simpo_gamma=1.0), r"unknown keyword argument\(s\) \['simpo_gamma'\] for loss_type='dpo'"),
    ("dpo", dict(ref_chosen_logps=_t(-1.0), ref_rejected_logps=_t(-1.0, -2.0)),
     r"ref_chosen_logps has shape \(1,\), expected \(2,\)"),
])
def test_errors(loss_type, kwargs, match):
    kwargs = {"beta": 0.1, **kwargs}
    p = dict(P)
    with pytest.raises(ValueError, match=match):
        preference_loss(loss_type, p.pop("policy_chosen_logps"), p.pop("policy_rejected_logps"),
                        kwargs.pop("ref_chosen_logps"), kwargs.pop("ref_rejected_logps"), **kwargs)


def test_combined_weights_length_mismatch():
    with pytest.raises(ValueError, match=r"weights has 1 entries, expected 2"):
        combined_preference_loss(["dpo", "sft"], [1.0], *P.values(), *R.values(), beta=0.1)


def test_combined_rejects_unused_settings():
    with pytest.raises(ValueError, match=r"label_smoothing=0\.1 is used by none of"):
        combined_preference_loss(["ipo", "sft"], None, *P.values(), *R.values(), beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['orpo_lambda'\]"):
        combined_preference_loss(["dpo"], None, *P.values(), *R.values(), beta=0.1, orpo_lambda=1.0)


def test_sft_loss_from_logps():
    pc = _t(-4.0, -9.0)
    assert sft_loss_from_logps(pc).tolist() == [4.0, 9.0]
    assert sft_loss_from_logps(pc, torch.tensor([2, 0]), average_log_probs=True).tolist() == [2.0, 9.0]
    with pytest.raises(ValueError, match="average_log_probs=True needs chosen_lengths"):
        sft_loss_from_logps(pc, average_log_probs=True)


# ---------------------------------------------------------------------------------------------
# Combined loss and metrics
# ---------------------------------------------------------------------------------------------


def test_combined_is_weighted_sum_with_routed_settings():
    got = call_combined(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=0.5, label_smoothing=0.1)
    want = [0.8 * a + 0.2 * b + c for a, b, c in zip(expected("sigmoid", BASIC, 0.5, eps=0.1),
                                                      expected("bco_pair", BASIC, 0.5), expected("sft", BASIC, 0.5))]
    assert_matches(got, want)
    default_weights = call_combined(["dpo", "ipo"], None, beta=0.5)
    assert_matches(default_weights, [a + b for a, b in zip(expected("dpo", BASIC, 0.5), expected("ipo", BASIC, 0.5))])


def test_combined_with_aot_keeps_the_mean():
    got = call_combined(["dpo", "aot"], None, beta=0.5)
    want = sum(expected("dpo", BASIC, 0.5)) / 3 + sum(expected("aot", BASIC, 0.5)) / 3
    assert got.mean().item() == pytest.approx(want)


def call_combined(types, weights, **kwargs):
    t = tensors(BASIC)
    args = [t.pop(k) for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                               "ref_rejected_logps")]
    return combined_preference_loss(types, weights, *args, **t, **kwargs)


def test_preference_metrics():
    t = tensors(BASIC, requires_grad=True)
    m = preference_metrics(t["policy_chosen_logps"], t["policy_rejected_logps"], t["ref_chosen_logps"],
                           t["ref_rejected_logps"], beta=0.5)
    dc = [a - b for a, b in zip(BASIC["pc"], BASIC["rc"])]
    dr = [a - b for a, b in zip(BASIC["pr"], BASIC["rr"])]
    want = {"rewards_chosen": dc, "rewards_rejected": dr, "acc": [float(a > b) for a, b in zip(dc, dr)],
            "margin_scaled": [0.5 * (a - b) for a, b in zip(dc, dr)], "rewards_chosen_scaled": [0.5 * a for a in dc],
            "rewards_rejected_scaled": [0.5 * b for b in dr], "logps_chosen": BASIC["pc"],
            "logps_rejected": BASIC["pr"]}
    assert set(m) == set(want)
    for key, values in want.items():
        assert not m[key].requires_grad
        assert m[key].tolist() == pytest.approx(values), key
    assert m["acc"].tolist() == [1.0, 0.0, 1.0]


def test_preference_metrics_acc_is_strict_and_reference_free():
    m = preference_metrics(_t(-1.0, -2.0), _t(-1.0, -3.0), None, None, beta=0.1)
    assert m["acc"].tolist() == [0.0, 1.0]
    assert m["rewards_chosen"].tolist() == [-1.0, -2.0]
