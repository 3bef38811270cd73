"""User mistakes end pretrain_gpt.py with one clean message and exit code 2 (issue 20, defects
8, 13 and 15); real bugs keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.training.user_errors import SHOW_TRACEBACK_ENV, UserError, argparse_output_on_rank_0, user_errors

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--log-interval", "1", "--eval-iters", "0",
    "--use-cpu-initialization", "--num-workers", "0", "--distributed-backend", "gloo",
]


def _run(argv, show_traceback=False):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", SHOW_TRACEBACK_ENV)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if show_traceback:
        env[SHOW_TRACEBACK_ENV] = "1"
    return subprocess.run([sys.executable, str(ROOT / "pretrain_gpt.py")] + argv, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def _clean_failure(run, *expected):
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count("error:") == 1, out[-3000:]
    for text in expected:
        assert text in run.stderr, run.stderr[-3000:]


def test_validation_error_is_one_message_and_exit_2_and_traceback_on_request():
    bad = TINY + ["--mock-data", "--train-iters", "1", "--num-attention-heads", "3"]
    _clean_failure(_run(bad), "--num-attention-heads 3")
    shown = _run(bad, show_traceback=True)
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "ValueError" in shown.stderr


def test_misspelled_flag_prints_usage_once_with_a_suggestion():
    run = _run(TINY + ["--mock-data", "--hiden-size", "32"])
    _clean_failure(run, "did you mean --hidden-size")
    assert run.stderr.count("usage:") == 1 and len(run.stderr.splitlines()) < 10, run.stderr


def test_neither_data_path_nor_mock_data_is_refused():
    _clean_failure(_run(TINY + ["--train-iters", "1"]), "--data-path", "--mock-data")


def test_missing_file_named_by_a_flag_is_one_message(tmp_path):
    missing = str(tmp_path / "no-such-blend.txt")
    _clean_failure(_run(TINY + ["--train-iters", "1", "--data-args-path", missing]), "--data-args-path", missing)


def test_static_loss_scale_that_overflows_every_step_stops_the_run():
    _clean_failure(_run(TINY + ["--mock-data", "--train-iters", "3", "--fp16", "--loss-scale", "1e30"]),
                   "--loss-scale 1e+30", "3 consecutive steps", "dynamic loss scaling")


def test_dynamic_loss_scaling_keeps_skipping_and_recovering():
    run = _run(TINY + ["--mock-data", "--train-iters", "3", "--fp16", "--initial-loss-scale", "1e30"])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]


def test_bugs_keep_their_traceback_and_only_setup_value_errors_are_user_errors():
    with pytest.raises(RuntimeError):
        with user_errors():
            raise RuntimeError("a bug")
    with pytest.raises(KeyError):
        with user_errors(setup=False):
            raise KeyError("a bug")
    with pytest.raises(ValueError):  # once training runs a ValueError may be a bug
        with user_errors(setup=False):
            raise ValueError("inside the training loop")
    with pytest.raises(SystemExit) as stopped:
        with user_errors(setup=False):
            raise UserError("a user's mistake found while training")
    assert stopped.value.code == 2


def test_only_rank_0_speaks_before_the_process_group_exists(monkeypatch, capsys):
    monkeypatch.delenv(SHOW_TRACEBACK_ENV, raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stopped:
        with argparse_output_on_rank_0(), user_errors():
            print("usage: from argparse", file=sys.stderr)
            raise ValueError("--hidden-size 0: must be positive")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        with user_errors():
            raise ValueError("--hidden-size 0: must be positive")
    assert capsys.readouterr().err.startswith("error: --hidden-size 0: must be positive")
