"""The README's main command, examples/run_tiny_gpt_cpu.sh, end to end on the shipped text: it
preprocesses, trains on 2 processes to a falling loss, saves a checkpoint and says where things went."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "run_tiny_gpt_cpu.sh"
ITERS = 10
# Smaller batches than the script's defaults keep this under a minute on 2 cores.
FASTER = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr-warmup-iters", "2", "--log-interval", "1",
          "--eval-interval", str(ITERS), "--save-interval", str(ITERS)]


def _installed() -> bool:
    probe = subprocess.run([sys.executable, str(REPO / "examples" / "check_install.py"), str(REPO)],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


def test_trains_on_the_shipped_text_to_a_falling_loss(tmp_path):
    if not _installed():
        pytest.skip("the project is not installed in this Python; the script would install it")
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, RUN_DIR=str(run_dir), ITERS=str(ITERS), DOCS="20", NPROC="2")
    proc = subprocess.run(["bash", str(SCRIPT), *FASTER], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "mock" not in out.lower()

    losses = [float(v) for v in re.findall(r"iteration\s+\d+/\s*\d+ \|.*? lm loss: ([0-9.E+-]+)", out)]
    assert len(losses) == ITERS, out[-4000:]
    assert losses[0] > 10.0, losses  # ln(50257) = 10.8: an untrained model on the GPT-2 vocabulary
    assert losses[-1] < losses[0] - 1.5, losses

    assert (run_dir / "data" / "kjv20_text_document.idx").is_file()
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    assert (run_dir / "train.log").read_text().count("lm loss:") >= ITERS
    assert f"Everything is under {run_dir}" in out
    assert f"{SCRIPT} --override-opt-param-scheduler" in out
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in out
    else:
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in out
