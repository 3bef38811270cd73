"""--step-batch-size-schedule: parsing, the batch size by consumed samples, resuming mid-schedule."""

import pytest

from megatron.core import num_microbatches_calculator as nmc


@pytest.fixture(autouse=True)
def _fresh_calculator():
    nmc.destroy_num_microbatches_calculator()
    yield
    nmc.destroy_num_microbatches_calculator()


def test_parse_converts_token_thresholds_to_samples():
    assert nmc.parse_step_batch_size_schedule("0:768 250B:1536 500B:3K", 4096) == \
        [(0, 768), (250 * 10**9 // 4096, 1536), (500 * 10**9 // 4096, 3000)]
    assert nmc.parse_step_batch_size_schedule("1.5M:16,0:8") == [(0, 8), (1_500_000, 16)]  # samples, sorted


@pytest.mark.parametrize("schedule, message", [
    ("1K:8 2K:16", "must start with a threshold of 0"),
    ("0:8 0:16", "must increase strictly"),
    ("0:8 100:16", "must increase strictly"),  # 100 tokens and 0 tokens are both sample 0 at seq 128
    ("0:8 64", "is not THRESHOLD:BATCH_SIZE"),
    ("0:8 1x:16", "'1X' is not a number"),
    ("0:0", "batch size 0 must be positive"),
])
def test_bad_schedules_name_the_flag(schedule, message):
    with pytest.raises(ValueError, match="--step-batch-size-schedule.*" + message):
        nmc.parse_step_batch_size_schedule(schedule, 128)


def _consume(calc, consumed, until):
    """(consumed samples, global batch) of each step, as the training loop runs them."""
    steps = []
    while consumed < until:
        calc.update(consumed, consistency_check=True)
        steps.append((consumed, calc.get_current_global_batch_size(), calc.get()))
        consumed += calc.get_current_global_batch_size()
    return steps


def test_batch_size_follows_consumed_samples_and_resumes_mid_schedule():
    # seq 32: 512 tokens = 16 samples, 1600 tokens = 50 samples.
    nmc.init_num_microbatches_calculator(0, None, None, 2, 2, step_batch_size_schedule="0:4 512:8 1600:16",
                                         seq_length=32)
    calc = nmc._calculator()
    steps = _consume(calc, 0, 100)
    assert [b for _, b, _ in steps] == [4, 4, 4, 4, 8, 8, 8, 8, 8, 16, 16, 16]
    assert [c for c, _, _ in steps][:6] == [0, 4, 8, 12, 16, 24] and steps[9][0] == 56  # 48 < 50: still 8
    assert [m for _, _, m in steps] == [b // 4 for _, b, _ in steps]
    # A run resumed from a checkpoint knows only its consumed samples: it continues identically.
    for cut in (3, 4, 7, 9):
        fresh = nmc.build_num_microbatches_calculator(0, None, None, 2, 2, step_batch_size_schedule="0:4 512:8 1600:16",
                                                      seq_length=32)
        assert _consume(fresh, steps[cut][0], 100) == steps[cut:]
    assert calc.global_batch_size == 16


def test_a_batch_not_divisible_by_the_layout_fails_when_it_is_reached():
    calc = nmc.build_num_microbatches_calculator(0, None, None, 2, 4, step_batch_size_schedule="0:8 40:12")
    calc.update(39, consistency_check=True)
    with pytest.raises(ValueError, match="global batch size to 12 after 40 consumed samples.*= 8"):
        calc.update(40, consistency_check=True)


def test_cannot_be_combined_with_a_ramp():
    with pytest.raises(ValueError, match="--step-batch-size-schedule cannot be combined with --rampup-batch-size"):
        nmc.build_num_microbatches_calculator(0, [4, 4, 16], 8, 2, 1, step_batch_size_schedule="0:8")
