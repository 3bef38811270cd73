"""--ddp-num-buckets N splits this rank's gradient buffer into N buckets of equal size (with
--overlap-grad-reduce, where buckets exist); it cannot be combined with --ddp-bucket-size."""

import pytest

from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import get_ddp_config

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1", "--overlap-grad-reduce"]


def test_num_buckets_sizes_the_buckets_from_the_parameter_count():
    args = parse_and_validate(BASE + ["--ddp-num-buckets", "4"])
    assert get_ddp_config(args, num_parameters=1001).bucket_size == 251  # ceil(1001 / 4)
    assert get_ddp_config(args, num_parameters=3).bucket_size == 1
    assert get_ddp_config(parse_and_validate(BASE + ["--ddp-bucket-size", "500"]), num_parameters=1001).bucket_size == 500


@pytest.mark.parametrize("extra, message", [
    (["--ddp-num-buckets", "0"], r"^--ddp-num-buckets 0: must be a positive integer"),
    (["--ddp-num-buckets", "2", "--ddp-bucket-size", "1000"], r"^--ddp-num-buckets 2: cannot be combined"),
])
def test_bad_values_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_and_validate(BASE + extra)
