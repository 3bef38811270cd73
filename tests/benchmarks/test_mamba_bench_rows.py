"""benchmarks/mamba_bench.py model rows: the log goes to --log-dir, and a run that gives no
timing says how far it got."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mamba_bench  # noqa: E402


def test_timed_out_row_names_its_progress_and_log(monkeypatch, tmp_path):
    seen = {}

    def fake_stream(cmd, log_path, quiet, timeout):
        seen["log"], seen["cmd"] = log_path, cmd
        return mamba_bench.TIMED_OUT, "building model ...\n> training ...\n"

    monkeypatch.setattr(mamba_bench, "_stream", fake_stream)
    row = mamba_bench.model_row("hybrid-1.3b", 16384, 65536, 4, 2, 5.0, [], str(tmp_path / "logs"))
    assert row["status"] == "timed out" and row["ms_per_iter"] is None
    assert row["progress"] == "0 iteration line(s); last line: > training ..."
    # 65,536 tokens per step at seq 16384: four sequences, one per micro-batch of 16,384 tokens
    assert Path(seen["log"]).parent == tmp_path / "logs" and (row["mbs"], row["gbs"]) == (1, 4)
    assert "--recompute-granularity" in seen["cmd"] and seen["cmd"][seen["cmd"].index("--global-batch-size") + 1] == "4"


def test_batch_shape_keeps_tokens_per_step():
    assert mamba_bench.batch_shape(4096, 65536, 16384) == (4, 16)
    assert mamba_bench.batch_shape(16384, 65536, 16384) == (1, 4)
    assert mamba_bench.batch_shape(65536, 65536, 16384) == (1, 1)
    # a sequence longer than the step: one sequence
    assert mamba_bench.batch_shape(131072, 65536, 16384) == (1, 1)


def test_batch_shape_refuses_a_step_that_does_not_split():
    import pytest

    with pytest.raises(ValueError, match="--micro-tokens"):
        mamba_bench.batch_shape(4096, 12 * 4096, 8 * 4096)
