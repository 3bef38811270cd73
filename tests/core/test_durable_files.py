"""Files written atomically (checkpoint tracker and manifest, index files) get the
permissions the umask gives any new file, not mkstemp's 0600."""

import os
import stat

import pytest

from megatron.core.durable_files import atomic_write


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_follows_the_umask(tmp_path, umask_022):
    target = str(tmp_path / "latest_checkpointed_iteration.txt")
    atomic_write(target, lambda handle: handle.write(b"4\n"))
    assert _mode(target) == 0o644
    os.umask(0o002)
    atomic_write(target, lambda handle: handle.write(b"6\n"))
    assert _mode(target) == 0o664
