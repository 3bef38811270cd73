"""--use-checkpoint-args logs what it takes: logging is set up before the checkpoint's
arguments are read, so its info lines (one per value taken) reach the console."""

from __future__ import annotations

import pytest

from megatron.training import initialize
from megatron.training.arguments import parse_args


class _Stop(Exception):
    pass


def test_logging_is_configured_before_checkpoint_args_are_read(monkeypatch):
    seen = []

    def fake_load(args):
        seen.append("load")
        raise _Stop

    monkeypatch.setattr(initialize, "_setup_logging", lambda args, rank: seen.append("logging"))
    monkeypatch.setattr(initialize, "load_args_from_checkpoint", fake_load)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(_Stop):
        initialize.initialize_megatron(parsed_args=parse_args(args=["--use-checkpoint-args", "--load", "x"]))
    assert seen == ["logging", "load"]
