"""pretrain_gpt with each iteration's loss printed exactly: ``LOSS <iteration> <float.hex>``.

Launched by the crash and exit tests under torch.distributed.run. Every rank first
prints ``PID <rank> <pid>`` (so a test can signal one rank); the last rank prints the
losses. Exact hex strings let a resumed run be compared bit for bit with an uninterrupted
one, where the log's rounded losses could hide a difference."""

import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO_ROOT)

import torch.distributed as dist  # noqa: E402

import pretrain_gpt  # noqa: E402
from megatron.core.transformer.enums import ModelType  # noqa: E402
from megatron.training import training  # noqa: E402
from megatron.training.initialize import shutdown_megatron  # noqa: E402


def _say(line: str) -> None:
    """One line in one write: the ranks share the pipe, and print() writes the text and its
    newline separately, so another rank's output could land between them."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _printing_train_step(original):
    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        iteration = args[-1] if len(args) >= 7 else kwargs["iteration"]
        if "lm loss" in result.losses and dist.get_rank() == dist.get_world_size() - 1:
            _say(f"LOSS {iteration} {float(result.losses['lm loss']).hex()}")
        return result

    return train_step


def _simulate_disk_full(spec: str) -> None:
    """``<rank>:<iteration>``: that rank's data-file write of that iteration's save fails
    with ENOSPC part-way, as on a full disk (inside the collective write, where a real
    disk-full error happens, so the other ranks learn of it the same way). The failure
    comes from the fault hook the training loop's saves are given."""
    import errno
    import functools

    from megatron.training.checkpointing import faults

    rank, iteration = (int(part) for part in spec.split(":"))

    def disk_full(phase, this_rank, this_iteration):
        if phase == "mid_shard" and (this_rank, this_iteration) == (rank, iteration):
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        faults.crash_point(phase, this_rank, this_iteration)

    training.save_checkpoint = functools.partial(training.save_checkpoint, fault_hook=disk_full)


def _pretend_started_earlier(minutes: float) -> None:
    """Backdate the run's start, so --exit-duration-in-mins (whole minutes; 0 means no
    limit) is reached after the first iteration instead of a minute later."""
    original = training.ExitConditions

    class Backdated(original):
        def __init__(self, args, start_time=None):
            super().__init__(args, start_time=(start_time or time.time()) - minutes * 60.0)

    training.ExitConditions = Backdated


if __name__ == "__main__":
    if os.environ.get("PRETEND_STARTED_MINUTES_AGO"):
        _pretend_started_earlier(float(os.environ["PRETEND_STARTED_MINUTES_AGO"]))
    if os.environ.get("SIMULATE_DISK_FULL"):
        _simulate_disk_full(os.environ["SIMULATE_DISK_FULL"])
    _say(f"PID {os.environ.get('RANK')} {os.getpid()}")
    training.train_step = _printing_train_step(training.train_step)
    training.pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                      ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
    # As pretrain_gpt.py does: left to interpreter exit, gloo's threads can abort the process.
    shutdown_megatron()
