"""SIGTERM while the model or the datasets are being built ends the run cleanly with
--exit-signal-handler (issue 20, defect 12), instead of killing the rank with -15."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.test_user_errors import TINY

ROOT = Path(__file__).resolve().parents[2]

# pretrain_gpt with a planted SIGTERM to itself inside the named provider.
SCRIPT = """
import os, signal, sys
import pretrain_gpt
from megatron.core.transformer.enums import ModelType
from megatron.training.training import pretrain

def signalled(fn):
    def wrapper(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)
    return wrapper

model, data = pretrain_gpt.model_provider, pretrain_gpt.train_valid_test_datasets_provider
if sys.argv[1] == "model":
    model = signalled(model)
else:
    data = signalled(data)
sys.argv = ["pretrain_gpt.py"] + sys.argv[2:]
pretrain(data, model, ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
print("RETURNED")
"""


@pytest.mark.parametrize("phase,said", [("model", "building the model"), ("data", "building the datasets")])
def test_sigterm_during_construction_exits_cleanly(phase, said):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    argv = TINY + ["--mock-data", "--train-iters", "3", "--exit-signal-handler"]
    run = subprocess.run([sys.executable, "-c", SCRIPT, phase] + argv, capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert f"received SIGTERM while {said}" in out and "RETURNED" in out, out[-3000:]
    assert "iteration        1/" not in out, out[-3000:]
