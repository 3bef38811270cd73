"""benchmarks/mamba_bench.py model rows: the log goes to --log-dir, and a run that gives no
timing says how far it got."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import mamba_bench  # noqa: E402


def test_timed_out_row_names_its_progress_and_log(monkeypatch, tmp_path):
    seen = {}

    def fake_stream(cmd, log_path, quiet, timeout):
        seen["log"] = log_path
        return mamba_bench.TIMED_OUT, "building model ...\n> training ...\n"

    monkeypatch.setattr(mamba_bench, "_stream", fake_stream)
    row = mamba_bench.model_row("hybrid-1.3b", 16384, 65536, 4, 2, 5.0, [], str(tmp_path / "logs"))
    assert row["status"] == "timed out" and row["ms_per_iter"] is None
    assert row["progress"] == "0 iteration line(s); last line: > training ..."
    assert Path(seen["log"]).parent == tmp_path / "logs" and row["mbs"] == 4
