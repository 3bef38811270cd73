"""Crash safety of checkpoint saves (DESIGN.md section 6), on real 2-rank runs.

One rank is SIGKILLed (MEGATRON_CKPT_CRASH) at each phase of the save of iteration 4
while the checkpoint of iteration 2 exists: the run dies, the tracker still names 2, the
unfinished ``.partial`` directory is skipped with a warning (a checkpoint committed before
the kill is loaded although the tracker lags), and resuming reproduces the uninterrupted
run's losses bit for bit. Damaged checkpoints, a full disk and a
checkpoint of another model fail loudly, naming the file or keys, and load nothing.
"""

from __future__ import annotations

import os

import pytest

from megatron.training.checkpointing import directory as layout
from megatron.training.checkpointing.manifest import read_manifest, verify_files
from tests.training.checkpointing import crash_harness as harness
from tests.training.checkpointing import load_probe

# (phase, rank killed): rank 1 at every phase, and rank 0 (which commits) after the commit.
CRASHES = [("before_shards", 1), ("mid_shard", 1), ("after_shards", 1), ("after_commit", 1), ("after_commit", 0)]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run of 6 iterations saving every 2: its losses and checkpoints."""
    root = str(tmp_path_factory.mktemp("baseline"))
    done = harness.run(harness.train_flags(6, save=root, save_interval=2))
    assert done.returncode == 0, done.output[-4000:]
    assert sorted(done.losses()) == [1, 2, 3, 4, 5, 6], done.output[-4000:]
    return root, done.losses()


@pytest.fixture(scope="module")
def crashed_and_resumed(baseline, tmp_path_factory):
    """{(phase, rank): (root, crashed run, root listing after the crash, resumed run)};
    the crashed runs go side by side, then the resumed ones."""
    source, _ = baseline
    roots = {case: harness.copy_checkpoint(source, 2, str(tmp_path_factory.mktemp(f"{case[0]}_{case[1]}")))
             for case in CRASHES}
    crashes = {case: harness.Launch(harness.train_flags(6, save=root, load=root, save_interval=2),
                                    crash=f"{case[0]}:{case[1]}:4") for case, root in roots.items()}
    crashed = {case: launch.finish() for case, launch in crashes.items()}
    after_crash = {case: (harness.tracker(root), sorted(os.listdir(root))) for case, root in roots.items()}
    resumes = {case: harness.Launch(harness.train_flags(6, save=root, load=root, save_interval=2))
               for case, root in roots.items()}
    return {case: (roots[case], crashed[case], after_crash[case], resumes[case].finish()) for case in CRASHES}


@pytest.mark.parametrize("phase,rank", CRASHES)
def test_kill_during_save_keeps_previous_checkpoint_and_resumes_exactly(phase, rank, baseline, crashed_and_resumed):
    _, uninterrupted = baseline
    root, crashed, (tracker_after_crash, listing), resumed = crashed_and_resumed[(phase, rank)]

    assert crashed.returncode != 0, f"the run survived the kill:\n{crashed.output[-3000:]}"
    assert [crashed.losses()[i] for i in (3, 4)] == [uninterrupted[3], uninterrupted[4]]
    assert tracker_after_crash == 2, f"tracker names {tracker_after_crash} after a kill at {phase}"
    partial = os.path.basename(layout.staging_dir(root, 4))
    committed = phase == "after_commit"
    if committed:
        # Committed but the tracker not yet moved: the newest committed checkpoint (4) is loaded.
        assert "iter_0000004" in listing and partial not in listing, listing
    else:
        assert partial in listing and "iter_0000004" not in listing, listing

    assert resumed.returncode == 0, resumed.output[-4000:]
    loaded = 4 if committed else 2
    assert "loading checkpoint from" in resumed.output and f"at iteration {loaded}" in resumed.output
    if committed:
        assert "names iteration 2 but" in resumed.output, resumed.output[-4000:]
    else:
        assert f"skipping {layout.staging_dir(root, 4)}" in resumed.output, resumed.output[-4000:]
    assert resumed.losses() == {i: uninterrupted[i] for i in range(loaded + 1, 7)}
    assert harness.tracker(root) == 6
    assert layout.partial_checkpoints(root) == []
    assert layout.committed_iterations(root) == [2, 4, 6]


def _flip_bytes(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        block = handle.read(8)
        handle.seek(os.path.getsize(path) // 2)
        handle.write(bytes(b ^ 0xFF for b in block))


def _truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 100)


DAMAGE = {
    "flipped": ("__1_0.distcp", _flip_bytes, "fails its CRC-32 check"),
    "truncated": ("__0_0.distcp", _truncate, "bytes, the manifest says"),
    "missing": ("__1_0.distcp", os.remove, "is missing"),
}


def test_damaged_checkpoints_fail_naming_the_file_and_load_nothing(baseline, tmp_path):
    source, _ = baseline
    roots, expected = [], []
    for name, (filename, damage, message) in DAMAGE.items():
        root = harness.copy_checkpoint(source, 2, str(tmp_path / name))
        damage(os.path.join(layout.iteration_dir(root, 2), filename))
        roots.append(root)
        expected.append([os.path.join(layout.iteration_dir(root, 2), filename), message])
    garbage = harness.copy_checkpoint(source, 2, str(tmp_path / "garbage_tracker"))
    with open(layout.tracker_path(garbage), "wb") as handle:
        handle.write(b"\x00\xffnot a number\n")
    roots.append(garbage)
    expected.append([layout.tracker_path(garbage), "expected an iteration number"])

    outcomes = load_probe.try_loads(roots, [])
    for root, (error, unchanged), needles in zip(roots, outcomes, expected):
        assert error is not None, f"{root} loaded without complaint"
        for needle in needles:
            assert needle in error, f"{root}: {needle!r} not in:\n{error}"
        assert unchanged, f"{root}: a failed load changed the model or optimizer"


def test_checkpoint_of_another_model_lists_mismatches_and_loads_nothing(baseline):
    source, _ = baseline
    other_model = ["--hidden-size", "128", "--num-layers", "3"]
    (error, unchanged), = load_probe.try_loads([source], other_model)
    assert error is not None, "a checkpoint of another model loaded"
    assert "nothing was loaded" in error
    assert "decoder.layers.2." in error, error  # a layer the checkpoint lacks
    assert "embedding.position_embeddings.weight: checkpoint (32, 64), this model (32, 128)" in error, error
    assert unchanged


def _assert_previous_checkpoint_intact(root: str) -> None:
    assert harness.tracker(root) == 2
    assert layout.committed_iterations(root) == [2]
    assert layout.partial_checkpoints(root) == [], "the failed save left its staging directory"
    directory = layout.iteration_dir(root, 2)
    assert verify_files(directory, read_manifest(directory)) == []


def test_disk_full_simulated_discards_the_save_and_keeps_the_previous(baseline, tmp_path):
    source, _ = baseline
    root = harness.copy_checkpoint(source, 2, str(tmp_path / "ckpt"))
    done = harness.run(harness.train_flags(6, save=root, load=root, save_interval=2),
                       extra_env={"SIMULATE_DISK_FULL": "1:4"})
    assert done.returncode != 0
    assert "saving the checkpoint of iteration 4" in done.output and "No space left on device" in done.output, \
        done.output[-4000:]
    assert "The previous checkpoint (iteration 2) is untouched" in done.output
    _assert_previous_checkpoint_intact(root)


def test_disk_full_on_a_small_tmpfs(tmp_path):
    reason = harness.unshare_available()
    if reason:
        pytest.skip(f"no private tmpfs ({reason}); the simulated disk-full test covers the behaviour")
    disk = tmp_path / "disk"
    disk.mkdir()
    root = str(disk)
    # One checkpoint is about 1.9 MB: the first fits in 3 MB, the second does not.
    save_then_fail = harness.train_flags(4, save=root, save_interval=2)
    load_previous = harness.train_flags(4, load=root)
    first, second, listing = harness.run_on_small_disk(root, "3m", [save_then_fail, load_previous])
    assert first.returncode != 0, first.output[-4000:]
    assert "saving the checkpoint of iteration 4" in first.output, first.output[-4000:]
    # Refused before writing, with the bytes needed and free (a full disk met mid-write is
    # reported obscurely by the writer, "unexpected pos ...").
    assert "was refused before writing: it needs about" in first.output, first.output[-4000:]
    assert "The previous checkpoint (iteration 2) is untouched" in first.output
    assert "iter_0000004.partial" not in listing.output and "iter_0000002" in listing.output, listing.output
    assert second.returncode == 0, second.output[-4000:]
    assert "successfully loaded checkpoint" in second.output and "at iteration 2" in second.output
    assert sorted(second.losses()) == [3, 4]


def test_checkpoint_with_tensors_this_model_lacks_or_another_vocabulary_is_refused(baseline):
    """Fewer tensors (no linear biases, RMSNorm without a bias) and a larger vocabulary
    (whose overlapping rows would fit): refused, naming the keys and the flags."""
    source, _ = baseline
    other = ["--disable-bias-linear", "--normalization", "RMSNorm", "--vocab-size", "1024"]
    (error, unchanged), = load_probe.try_loads([source], other)
    assert error is not None, "a checkpoint of another model loaded"
    assert "in the checkpoint but not in this model" in error and "nothing was loaded" in error, error
    assert "decoder.layers.0.self_attention.linear_proj.bias" in error, error
    assert "decoder.final_layernorm.bias" in error, error
    assert "--vocab-size: checkpoint 512, this run 1024" in error, error
    assert "--disable-bias-linear (add_bias_linear): checkpoint True, this run False" in error, error
    assert "--normalization (normalization): checkpoint 'LayerNorm', this run 'RMSNorm'" in error, error
    assert unchanged
