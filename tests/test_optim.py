"""Optimiser param groups and LR schedules (nemo_aligner/training/optim.py) against hand-computed values."""

import copy
import math

import pytest
import torch
from torch import nn

from nemo_aligner.training.optim import build_optimizer, build_scheduler, lr_at

BASE, MIN = 1e-3, 1e-4


def cosine(step, warmup, decay):
    """Independent NeMo-style cosine: base at the start of the decay, min at its end."""
    return MIN + (BASE - MIN) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))


def at(step, name="CosineAnnealing", max_steps=100, warmup=10, constant=20, min_lr=MIN):
    return lr_at(step, base_lr=BASE, name=name, max_steps=max_steps, warmup_steps=warmup,
                 constant_steps=constant, min_lr=min_lr)


# ------------------------------------------------------------------------------------------ lr_at
@pytest.mark.parametrize("name", ["CosineAnnealing", "constant", "linear"])
def test_warmup_is_linear_and_never_zero(name):
    assert at(0, name) == pytest.approx(BASE * 1 / 10)
    assert at(4, name) == pytest.approx(BASE * 5 / 10)
    assert at(9, name) == pytest.approx(BASE)


def test_cosine_annealing():
    # max 100, warmup 10, constant 20 -> decay over the 70 steps 10..79, min_lr on 80..99 and after.
    assert at(10) == pytest.approx(BASE)
    assert at(30) == pytest.approx(cosine(30, 10, 70))
    assert at(45) == pytest.approx((BASE + MIN) / 2)  # middle of the decay
    assert at(79) == pytest.approx(cosine(79, 10, 70))
    assert at(80) == pytest.approx(MIN)  # start of the constant tail
    assert at(99) == pytest.approx(MIN)  # its last step
    assert at(100) == at(250) == pytest.approx(MIN)  # past max_steps


def test_cosine_without_constant_tail_or_warmup():
    assert at(0, warmup=0, constant=0) == pytest.approx(BASE)
    assert at(25, warmup=0, constant=0) == pytest.approx(cosine(25, 0, 100))
    assert at(100, warmup=0, constant=0) == pytest.approx(MIN)


def test_constant_steps_longer_than_run_are_clamped(caplog):
    # NeMo's default constant_steps=1000 on a 50-step demo: min_lr right after warmup, no crash.
    assert at(9, max_steps=50, constant=1000) == pytest.approx(BASE)
    assert at(10, max_steps=50, constant=1000) == pytest.approx(MIN)
    assert at(49, max_steps=50, constant=1000) == pytest.approx(MIN)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=BASE)
    with caplog.at_level("WARNING"):
        build_scheduler(optimizer, max_steps=50, warmup_steps=10, constant_steps=1000, min_lr=MIN)
    assert "constant_steps=1000" in caplog.text


def test_warmup_longer_than_run():
    assert at(19, max_steps=10, warmup=40) == pytest.approx(BASE * 20 / 40)


def test_constant():
    assert at(10, "constant") == at(99, "constant") == at(1000, "constant") == pytest.approx(BASE)


def test_linear():
    # constant_steps is a CosineAnnealing setting; linear reaches min_lr exactly at max_steps.
    assert at(10, "linear") == pytest.approx(BASE)
    assert at(55, "linear") == pytest.approx(BASE + (MIN - BASE) * 45 / 90)
    assert at(100, "linear") == at(150, "linear") == pytest.approx(MIN)


# ------------------------------------------------------------------------------------ scheduler
def make_optimizer():
    """Two param groups (decay / no decay) sharing one base LR, as the recipes build them."""
    return build_optimizer(nn.Linear(2, 2), lr=BASE, weight_decay=0.1, betas=(0.9, 0.98))


def drive(optimizer, scheduler, num_steps):
    """The LR of each of `num_steps` updates (all groups share it)."""
    lrs = []
    for _ in range(num_steps):
        assert len({g["lr"] for g in optimizer.param_groups}) == 1
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


SCHED = dict(max_steps=30, warmup_steps=5, constant_steps=5, min_lr=MIN)


@pytest.mark.parametrize("name", ["CosineAnnealing", "constant", "linear"])
def test_scheduler_follows_lr_at(name):
    optimizer = make_optimizer()
    scheduler = build_scheduler(optimizer, name=name, **SCHED)
    lrs = drive(optimizer, scheduler, 35)
    expected = [lr_at(step, base_lr=BASE, name=name, **_lr_at_kwargs(SCHED)) for step in range(35)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def _lr_at_kwargs(sched):
    return dict(max_steps=sched["max_steps"], warmup_steps=sched["warmup_steps"],
                constant_steps=sched["constant_steps"], min_lr=sched["min_lr"])


def test_resume_with_last_step_matches_uninterrupted():
    optimizer = make_optimizer()
    straight = drive(optimizer, build_scheduler(optimizer, **SCHED), 35)
    resumed_optimizer = make_optimizer()
    resumed = build_scheduler(resumed_optimizer, last_step=12, **SCHED)
    assert resumed.get_last_lr()[0] == pytest.approx(straight[12], rel=1e-12)
    assert drive(resumed_optimizer, resumed, 23) == pytest.approx(straight[12:], rel=1e-12)


def test_resume_with_state_dicts_matches_uninterrupted():
    optimizer = make_optimizer()
    scheduler = build_scheduler(optimizer, **SCHED)
    first = drive(optimizer, scheduler, 12)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    rest = drive(optimizer, scheduler, 23)
    # Restart: fresh objects built from the config, then the saved state loaded.
    new_optimizer = make_optimizer()
    new_scheduler = build_scheduler(new_optimizer, **SCHED)
    new_optimizer.load_state_dict(saved_optimizer)
    new_scheduler.load_state_dict(saved_scheduler)
    assert first + drive(new_optimizer, new_scheduler, 23) == pytest.approx(first + rest, rel=1e-12)


def test_scheduler_built_after_loading_optimizer_state_keeps_base_lr():
    optimizer = make_optimizer()
    drive(optimizer, build_scheduler(optimizer, **SCHED), 12)  # lr now mid-schedule
    new_optimizer = make_optimizer()
    new_optimizer.load_state_dict(optimizer.state_dict())
    resumed = build_scheduler(new_optimizer, last_step=12, **SCHED)
    assert resumed.base_lrs == [BASE, BASE]
    assert resumed.get_last_lr()[0] == pytest.approx(lr_at(12, base_lr=BASE, name="CosineAnnealing",
                                                           **_lr_at_kwargs(SCHED)))


# ------------------------------------------------------------------------------------ optimiser
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(4))  # a 1-D parameter outside any norm
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_only_matrices():
    model = Tiny()
    optimizer = build_optimizer(model, name="distributed_fused_adam", lr=BASE, weight_decay=0.1, betas=[0.9, 0.98])
    assert isinstance(optimizer, torch.optim.AdamW)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert by_decay[0.1] == {id(model.embed.weight), id(model.proj.weight)}
    assert by_decay[0.0] == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias), id(model.scale)}
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98)


def test_frozen_params_get_no_optimizer_state():
    model = Tiny()
    optimizer = build_optimizer(model, lr=BASE, weight_decay=0.1, betas=(0.9, 0.98))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.frozen.weight) not in in_optimizer and id(model.frozen.bias) not in in_optimizer
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert id(model.frozen.weight) not in {id(p) for p in optimizer.state}
    assert len(optimizer.state) == len(in_optimizer)


def test_iterable_of_params_uses_ndim_rule():
    matrix, vector, frozen = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3)), torch.ones(3, 3)
    optimizer = build_optimizer([matrix, vector, frozen, matrix], lr=BASE, weight_decay=0.05, betas=(0.9, 0.95))
    groups = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    assert [id(p) for p in groups[0.05]] == [id(matrix)]
    assert [id(p) for p in groups[0.0]] == [id(vector)]


def test_fused_on_cpu_for_plain_tensors_and_equal_to_the_loop():
    model = Tiny()
    optimizer = build_optimizer(model, lr=BASE, weight_decay=0.1, betas=(0.9, 0.98))
    assert optimizer.defaults["fused"]
    twin = copy.deepcopy(model)
    loop = build_optimizer(twin, lr=BASE, weight_decay=0.1, betas=(0.9, 0.98), fused=False)
    for _ in range(3):
        for m in (model, twin):
            for p in m.parameters():
                p.grad = torch.ones_like(p) * 0.3
        optimizer.step()
        loop.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


# ------------------------------------------------------------------------------------ errors
def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match=r"model\.optim\.name='sgd'.*adamw"):
        build_optimizer(Tiny(), name="sgd", lr=BASE, weight_decay=0.1, betas=(0.9, 0.98))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), r"model\.optim\.lr=0\.0"),
    (dict(weight_decay=-1.0), r"model\.optim\.weight_decay=-1\.0"),
    (dict(betas=(0.9, 1.0)), r"model\.optim\.betas"),
    (dict(betas=(0.9,)), r"model\.optim\.betas"),
    (dict(eps=0.0), r"model\.optim\.eps"),
])
def test_bad_optimizer_hyperparameters(kwargs, match):
    settings = dict(lr=BASE, weight_decay=0.1, betas=(0.9, 0.98)) | kwargs
    with pytest.raises(ValueError, match=match):
        build_optimizer(Tiny(), **settings)


def test_no_trainable_params():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=BASE, weight_decay=0.1, betas=(0.9, 0.98))


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="WarmupHold"), r"model\.optim\.sched\.name='WarmupHold'.*CosineAnnealing"),
    (dict(min_lr=2e-3), r"model\.optim\.sched\.min_lr=0\.002 is larger than model\.optim\.lr"),
    (dict(min_lr=-1.0), r"model\.optim\.sched\.min_lr=-1\.0 must be >= 0"),
    (dict(warmup_steps=-1), r"model\.optim\.sched\.warmup_steps=-1"),
    (dict(constant_steps=-1), r"model\.optim\.sched\.constant_steps=-1"),
    (dict(max_steps=0), r"max_steps >= 1"),
    (dict(last_step=-1), r"last_step=-1"),
])
def test_bad_schedule(kwargs, match):
    settings = dict(SCHED) | kwargs
    with pytest.raises(ValueError, match=match):
        build_scheduler(make_optimizer(), **settings)


def test_lr_at_validates_too():
    with pytest.raises(ValueError, match=r"model\.optim\.sched\.name"):
        lr_at(0, base_lr=BASE, name="cosine", max_steps=10, warmup_steps=0, constant_steps=0, min_lr=0.0)
