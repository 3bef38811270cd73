"""Dynamic loss scaling follows Megatron's hysteresis / growth-window rules."""

import pytest
import torch

from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler


def _dynamic(**kw):
    args = dict(initial_scale=2.0**10, min_scale=2.0**8, growth_factor=2.0, backoff_factor=0.5,
                growth_interval=3, hysteresis=2, device=torch.device("cpu"))
    args.update(kw)
    return DynamicGradScaler(**args)


def test_hysteresis_then_backoff_then_floor():
    s = _dynamic()
    s.update(True)  # hysteresis 2 -> 1: scale kept
    assert s.scale.item() == 2.0**10
    s.update(True)  # hysteresis exhausted: halve
    assert s.scale.item() == 2.0**9
    s.update(True)  # still exhausted: halve again on every overflow
    assert s.scale.item() == 2.0**8
    s.update(True)  # floored at min_scale
    assert s.scale.item() == 2.0**8
    assert s.inv_scale.item() == 2.0**-8


def test_growth_after_window_refills_hysteresis():
    s = _dynamic()
    s.update(True)
    s.update(False)
    s.update(False)
    assert s.scale.item() == 2.0**10
    s.update(False)  # third clean step in a row: double
    assert s.scale.item() == 2.0**11
    s.update(True)  # hysteresis was refilled to 2: no backoff yet
    assert s.scale.item() == 2.0**11


def test_overflow_resets_growth_count():
    s = _dynamic(hysteresis=5)
    s.update(False)
    s.update(False)
    s.update(True)
    s.update(False)
    s.update(False)
    assert s.scale.item() == 2.0**10
    s.update(False)
    assert s.scale.item() == 2.0**11


def test_state_dict_round_trip():
    s = _dynamic()
    for found in (True, True, False):
        s.update(found)
    other = _dynamic()
    other.load_state_dict(s.state_dict())
    assert other.scale.item() == s.scale.item() == 2.0**9
    assert (other._growth_tracker, other._hysteresis_tracker) == (1, 0)


def test_constant_scaler():
    s = ConstantGradScaler(128.0, device=torch.device("cpu"))
    s.update(True)
    assert s.scale.item() == 128.0 and s.state_dict() == {}


@pytest.mark.parametrize("kw", [{"min_scale": 2.0**11}, {"hysteresis": 0}, {"growth_interval": 0}, {"backoff_factor": 1.0}])
def test_invalid_settings(kw):
    with pytest.raises(ValueError):
        _dynamic(**kw)
