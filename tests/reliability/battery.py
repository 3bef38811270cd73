"""The reliability battery, R1-R21: what a run can count on, each promise with its tests.

Most promises are held by tests that live next to the code they test; this table names
them (pytest node ids, relative to the repository root) rather than running them twice.
``tests/reliability/test_battery.py`` holds the ones with no other home, and checks that
every test named here exists.

    python -m pytest -q -p no:cacheprovider $(python -m tests.reliability.battery)   # the whole battery
"""

from __future__ import annotations

from typing import Dict, List, Tuple

CKPT = "tests/training/checkpointing"
HERE = "tests/reliability/test_battery.py"

# R -> (the promise, the tests that hold it)
BATTERY: Dict[str, Tuple[str, List[str]]] = {
    "R1": ("resume continues bit-exactly, in every parallel layout",
           [f"{CKPT}/test_resume.py::test_resume_continues_bit_exactly",
            f"{CKPT}/test_resume.py::test_saving_does_not_change_the_run"]),
    "R2": ("kill -9 of a rank at every phase of a save keeps the previous checkpoint, and the resumed run "
           "equals the uninterrupted one",
           [f"{CKPT}/test_crash_safety.py::test_kill_during_save_keeps_previous_checkpoint_and_resumes_exactly"]),
    "R3": ("SIGTERM to one rank: all ranks stop after the same iteration, save once, exit 0",
           [f"{CKPT}/test_exit.py::test_sigterm_to_one_rank_stops_all_at_one_iteration_with_one_checkpoint"]),
    "R4": ("SIGTERM to the launcher's process group (DataLoader workers too): one checkpoint, no worker error",
           [f"{CKPT}/test_launcher_signals.py::test_sigterm_to_the_launchers_group_saves_with_dataloader_workers"]),
    "R5": ("SIGTERM while the model or the datasets are built: a clean exit, status 0",
           ["tests/training/test_signal_during_setup.py::test_sigterm_during_construction_exits_cleanly"]),
    "R6": ("a peer that dies: the surviving ranks fail at once, naming their rank, iteration and phase",
           [f"{HERE}::test_R6_peer_death_is_reported_with_rank_iteration_and_phase"]),
    "R7": ("a hang: the watchdog names the rank, iteration and phase, dumps the stacks, and can exit",
           ["tests/training/test_hang_watchdog.py::test_a_stall_is_reported_once_with_rank_iteration_phase_and_stacks",
            "tests/training/test_hang_watchdog.py::test_a_hung_training_run_exits_124"]),
    "R8": ("a NaN/Inf loss or gradient stops the run before the optimizer step, naming rank and iteration",
           ["tests/training/test_training_loop.py::test_nan_loss_stops_before_the_step_naming_rank_and_iteration",
            "tests/training/test_result_validation.py::test_reproduced_nan_is_the_nan_error"]),
    "R9": ("a rejected result is re-run: a transient one saves and exits 17, a reproducible spike is skipped "
           "and counted",
           ["tests/training/test_result_validation.py::test_transient_nan_reruns_then_saves_and_exits_17",
            "tests/training/test_result_validation.py::test_spiky_loss_is_skipped_and_counted",
            "tests/core/test_rerun_state_machine.py"]),
    "R10": ("a checkpoint loads into another parallel layout (resharding) exactly, and training continues",
            [f"{CKPT}/test_reshard.py::test_every_load_restores_the_saved_state_exactly",
             f"{CKPT}/test_reshard.py::test_training_continues_after_each_load"]),
    "R11": ("a checkpoint of another model (size, vocabulary, bias, norm) is refused, listing the mismatches; "
            "nothing is loaded",
            [f"{CKPT}/test_crash_safety.py::test_checkpoint_of_another_model_lists_mismatches_and_loads_nothing",
             f"{CKPT}/test_crash_safety.py::"
             "test_checkpoint_with_tensors_this_model_lacks_or_another_vocabulary_is_refused"]),
    "R12": ("a damaged checkpoint file is named and nothing is loaded; an unverifiable one is said to be",
            [f"{CKPT}/test_crash_safety.py::test_damaged_checkpoints_fail_naming_the_file_and_load_nothing",
             f"{CKPT}/test_unverified_load.py"]),
    "R13": ("the newest committed checkpoint wins over a stale or missing tracker; a used --save is not "
            "overwritten backwards",
            [f"{CKPT}/test_tracker_rules.py"]),
    "R14": ("a disk that is full, or would be, fails the save on every rank and keeps the previous checkpoint",
            [f"{CKPT}/test_crash_safety.py::test_disk_full_simulated_discards_the_save_and_keeps_the_previous",
             f"{CKPT}/test_crash_safety.py::test_disk_full_on_a_small_tmpfs", f"{CKPT}/test_free_space.py"]),
    "R15": ("an asynchronous save commits the same tensors as a synchronous one",
            [f"{CKPT}/test_exit.py::test_async_save_commits_the_same_tensors_as_a_synchronous_save"]),
    "R16": ("bad data fails when opened, naming the file: a damaged .idx/.bin, token ids beyond the "
            "vocabulary, a tampered index cache",
            ["tests/core/datasets/test_indexed_dataset.py", "tests/core/datasets/test_token_range.py",
             "tests/core/datasets/test_index_cache_validation.py",
             "tests/core/datasets/test_index_cache_checksums.py"]),
    "R17": ("determinism: two runs with the same seed are bit-identical",
            ["tests/training/test_deterministic_mode.py::test_two_runs_are_bit_identical"]),
    "R18": ("retention: old checkpoints are deleted only after a newer one is committed",
            [f"{CKPT}/test_exit.py::test_exit_interval_saves_and_stops_and_keeps_the_last_two"]),
    "R19": ("restarts: torchrun --max-restarts resumes from the newest committed checkpoint",
            [f"{CKPT}/test_launcher_signals.py::test_torchrun_max_restarts_resumes_from_the_last_checkpoint"]),
    "R20": ("untrusted files: no pickle in a checkpoint, an index cache or the converter's files runs code",
            ["tests/core/test_safe_unpickle.py", "tests/core/test_weights_only_loads.py"]),
    "R21": ("user mistakes end the run with one message and exit code 2",
            ["tests/training/test_user_errors.py"]),
}


def node_ids() -> List[str]:
    return [node for _, nodes in BATTERY.values() for node in nodes]


if __name__ == "__main__":
    print(" ".join(node_ids()))
