"""LR and weight-decay schedules against hand-computed values (steps are samples)."""

import math

import pytest
import torch

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def _optimizer():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    return torch.optim.SGD(
        [
            {"params": [a]},
            {"params": [b], "lr_mult": 2.0, "wd_mult": 0.0},
            {"params": [c], "max_lr": 0.5, "min_lr": 0.05},
        ],
        lr=1.0,
    )


def _scheduler(style="linear", warmup=10, decay=110, wsd_steps=None, wsd_style=None, **kw):
    args = dict(
        init_lr=0.0, max_lr=1.0, min_lr=0.1, lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=style,
        start_wd=0.01, end_wd=0.01, wd_incr_steps=100, wd_incr_style="constant",
        wsd_decay_steps=wsd_steps, lr_wsd_decay_style=wsd_style,
    )
    args.update(kw)
    opt = args.pop("optimizer", None) or _optimizer()
    return OptimizerParamScheduler(opt, **args), opt


def _lr_at(sched, opt, steps, group=0):
    sched.step(steps - sched.num_steps)
    return opt.param_groups[group]["lr"]


# (style, {samples: lr}) with init 0, max 1, min 0.1, warmup 10, decay horizon 110.
CASES = {
    "linear": {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 85: 0.325, 110: 0.1, 500: 0.1},
    "cosine": {5: 0.5, 10: 1.0, 35: 0.1 + 0.9 * 0.5 * (math.cos(math.pi / 4) + 1), 60: 0.55, 110: 0.1, 111: 0.1},
    "constant": {5: 0.5, 10: 1.0, 60: 1.0, 500: 1.0},
}


@pytest.mark.parametrize("style", sorted(CASES))
def test_decay_styles(style):
    sched, opt = _scheduler(style)
    for steps, lr in CASES[style].items():
        assert _lr_at(sched, opt, steps) == pytest.approx(lr, abs=1e-12), (style, steps)


def test_inverse_square_root():
    sched, opt = _scheduler("inverse-square-root", warmup=16, decay=1000)
    # max_lr * sqrt(warmup) / sqrt(step), floored at min_lr, min_lr past the horizon.
    for steps, lr in {8: 0.5, 16: 1.0, 64: 0.5, 400: 0.2, 900: 4 / 30, 1001: 0.1}.items():
        assert _lr_at(sched, opt, steps) == pytest.approx(lr, abs=1e-12), steps
    sched, opt = _scheduler("inverse-square-root", warmup=16, decay=100000)
    assert _lr_at(sched, opt, 6400) == pytest.approx(0.1)  # 4/80 = 0.05 floored at 0.1


@pytest.mark.parametrize(
    "wsd_style, at100, at105",
    [
        ("exponential", 0.1 + 0.9 * (2 * 0.5**0.5 - 1), 0.1 + 0.9 * (2 * 0.5**0.75 - 1)),
        ("linear", 0.55, 0.325),
        ("cosine", 0.55, 0.1 + 0.9 * 0.5 * (math.cos(0.75 * math.pi) + 1)),
        ("minus_sqrt", 0.1 + 0.9 * (1 - 0.5**0.5), 0.1 + 0.9 * (1 - 0.75**0.5)),
    ],
)
def test_wsd_phases(wsd_style, at100, at105):
    # warmup to 10, stable until 90, anneal over the last 20 samples of the 110 horizon.
    sched, opt = _scheduler("WSD", wsd_steps=20, wsd_style=wsd_style)
    assert _lr_at(sched, opt, 5) == pytest.approx(0.5)
    assert _lr_at(sched, opt, 50) == 1.0
    assert _lr_at(sched, opt, 90) == 1.0
    assert _lr_at(sched, opt, 100) == pytest.approx(at100, abs=1e-12)
    assert _lr_at(sched, opt, 105) == pytest.approx(at105, abs=1e-12)
    assert _lr_at(sched, opt, 110) == pytest.approx(0.1, abs=1e-12)
    assert _lr_at(sched, opt, 111) == 0.1


def test_group_multipliers_and_own_lr_range():
    sched, opt = _scheduler("linear")
    sched.step(60)
    lrs = [g["lr"] for g in opt.param_groups]
    wds = [g["weight_decay"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.55, 1.1, 0.05 + 0.5 * 0.45])
    assert wds == pytest.approx([0.01, 0.0, 0.01])


@pytest.mark.parametrize("style, at25", [("linear", 0.025), ("cosine", 0.1 * 0.5 * (math.cos(0.75 * math.pi) + 1))])
def test_weight_decay_increment(style, at25):
    sched, opt = _scheduler(start_wd=0.0, end_wd=0.1, wd_incr_style=style)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    sched.step(25)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(at25, abs=1e-12)
    sched.step(100)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)


def test_state_dict_round_trip():
    sched, opt = _scheduler("cosine")
    sched.step(35)
    saved = sched.state_dict()
    fresh, fresh_opt = _scheduler("cosine")
    fresh.load_state_dict(saved)
    assert fresh.num_steps == 35
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    fresh.step(25)
    sched.step(25)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.55)


def test_checkpoint_versus_command_line():
    sched, _ = _scheduler("cosine")
    sched.step(20)
    saved = sched.state_dict()
    strict, _ = _scheduler("cosine", max_lr=2.0, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="--use-checkpoint-opt-param-scheduler"):
        strict.load_state_dict(saved)
    from_ckpt, _ = _scheduler("cosine", max_lr=2.0)
    from_ckpt.load_state_dict(saved)
    assert from_ckpt.max_lr == 1.0 and from_ckpt.num_steps == 20
    override, _ = _scheduler(
        "cosine", max_lr=2.0, use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True
    )
    override.load_state_dict(saved)
    assert override.max_lr == 2.0 and override.num_steps == 20


def test_a_longer_run_is_reported_in_samples_with_both_flags():
    """Resuming with a larger --train-iters: the schedule counts samples, and the
    message must say so (it once said "iterations" beside sample counts)."""
    saved, _ = _scheduler("cosine", decay=32)
    longer, _ = _scheduler("cosine", decay=48, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError) as error:
        longer.load_state_dict(saved.state_dict())
    message = str(error.value)
    assert "decay samples" in message and "(48)" in message and "(32)" in message
    assert "--override-opt-param-scheduler" in message and "--use-checkpoint-opt-param-scheduler" in message


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"min_lr": 2.0}, "--min-lr"),
        ({"warmup": 110}, "warmup"),
        ({"style": "WSD"}, "--lr-wsd-decay"),
        ({"style": "step"}, "--lr-decay-style"),
        ({"init_lr": 5.0}, "--lr-warmup-init"),
        ({"start_wd": 0.0, "end_wd": 0.1}, "--weight-decay-incr-style"),
        ({"override_opt_param_scheduler": True}, "mutually exclusive"),
    ],
)
def test_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _scheduler(**kw)
