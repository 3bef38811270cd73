"""tests/run_all.sh: with arguments, pytest gets exactly those; without, the tests tree less the
tests marked slow (what CI runs)."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in for python3 that records each call's arguments instead of running anything."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "python3"
    script.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, calls


def _pytest_call(fake_python, *args):
    script, calls = fake_python
    subprocess.run(["bash", str(REPO / "tests" / "run_all.sh"), *args], env=dict(os.environ, PYTHON=str(script)),
                   check=True, timeout=60)
    lines = calls.read_text().splitlines()
    assert any(line.startswith("-m pip install") for line in lines), lines
    return lines[-1]


def test_arguments_go_to_pytest(fake_python):
    call = _pytest_call(fake_python, "tests/tools/test_convert.py", "-x", "-k", "hf and not export")
    assert call == "-m pytest -q -p no:cacheprovider tests/tools/test_convert.py -x -k hf and not export"


def test_no_arguments_run_the_tree_without_the_slow_tests(fake_python):
    assert _pytest_call(fake_python) == "-m pytest -q -p no:cacheprovider tests -m not slow"


def test_the_whole_tree_runs_when_named(fake_python):
    assert _pytest_call(fake_python, "tests") == "-m pytest -q -p no:cacheprovider tests"
