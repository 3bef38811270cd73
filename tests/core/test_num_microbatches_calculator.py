"""Micro-batch counts: constant, ramp-up sequences, and the divisibility errors."""

import pytest

from megatron.core import num_microbatches_calculator as nmc


@pytest.fixture(autouse=True)
def _fresh_calculator():
    nmc.destroy_num_microbatches_calculator()
    yield
    nmc.destroy_num_microbatches_calculator()


def test_constant():
    nmc.init_num_microbatches_calculator(0, None, global_batch_size=32, micro_batch_size=2, data_parallel_size=4)
    assert nmc.get_num_microbatches() == 4
    assert nmc.get_current_global_batch_size() == 32
    assert nmc.get_micro_batch_size() == 2
    nmc.update_num_microbatches(10_000)
    assert nmc.get_num_microbatches() == 4


def test_indivisible_global_batch_names_the_flags():
    with pytest.raises(ValueError, match="--global-batch-size 30.*--micro-batch-size"):
        nmc.init_num_microbatches_calculator(0, None, 30, 2, 4)


def test_decrease_batch_size_if_needed_rounds_down():
    nmc.init_num_microbatches_calculator(0, None, 30, 2, 4, decrease_batch_size_if_needed=True)
    assert nmc.get_num_microbatches() == 3
    assert nmc.get_current_running_global_batch_size() == 24
    assert nmc.get_current_global_batch_size() == 30


def test_rampup_sequence():
    # 16 -> 64 by 8: 6 increments over 96 samples, one every 16 samples.
    nmc.init_num_microbatches_calculator(0, [16, 8, 96], 64, 2, 2)
    expected = {0: 16, 15: 16, 16: 24, 31: 24, 32: 32, 48: 40, 64: 48, 80: 56, 95: 56, 96: 64, 97: 64, 10**6: 64}
    for consumed, gbs in expected.items():
        nmc.update_num_microbatches(consumed)
        assert nmc.get_current_global_batch_size() == gbs, consumed
        assert nmc.get_num_microbatches() == gbs // 4, consumed


def test_rampup_fractional_increment_interval():
    # 48 / 6 increments = 16.67 samples each, as Megatron (int(consumed / 16.67)).
    nmc.init_num_microbatches_calculator(0, [16, 8, 100], 64, 2, 2)
    for consumed, gbs in {16: 16, 17: 24, 50: 40, 99: 56, 100: 64}.items():
        nmc.update_num_microbatches(consumed)
        assert nmc.get_current_global_batch_size() == gbs, consumed


def test_rampup_consistency_check():
    # mbs*dp = 8; the ramp step 20 is not a multiple of 8.
    nmc.init_num_microbatches_calculator(0, [16, 4, 40], 32, 2, 4)
    with pytest.raises(ValueError, match="--global-batch-size 20"):
        nmc.update_num_microbatches(10, consistency_check=True)
    nmc.update_num_microbatches(10, consistency_check=False)
    assert nmc.get_num_microbatches() == 2


@pytest.mark.parametrize(
    "rampup, match",
    [([16, 5, 100], "not divisible by the increment"), ([128, 8, 100], "larger than"), ([16, 8], "three values")],
)
def test_rampup_errors(rampup, match):
    with pytest.raises(ValueError, match=match):
        nmc.init_num_microbatches_calculator(0, rampup, 64, 2, 2)


def test_lifecycle_errors():
    with pytest.raises(RuntimeError, match="not initialized"):
        nmc.get_num_microbatches()
    nmc.init_num_microbatches_calculator(0, None, 8, 1, 1)
    with pytest.raises(RuntimeError, match="already initialized"):
        nmc.init_num_microbatches_calculator(0, None, 8, 1, 1)
    nmc.reconfigure_num_microbatches_calculator(0, None, 16, 1, 1)
    assert nmc.get_num_microbatches() == 16
