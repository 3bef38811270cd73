"""benchmarks/pretrain_bench.py --fp8: each config runs in bf16 and in FP8 in the same
invocation, and the report ends with the FP8/bf16 tokens/s ratio (runs faked here; the
real CPU run of the driver is test_pretrain_bench.py's)."""

from __future__ import annotations

from tests.benchmarks.test_pretrain_bench import REAL_ITERATION_LINE, bench


def test_fp8_runs_both_precisions_and_reports_the_speedup(monkeypatch, tmp_path, capsys):
    iteration = REAL_ITERATION_LINE.replace("5/       6", "{}/       6").replace("88.0", "{}")
    launched = []

    def fake_stream(cmd, log_path, quiet, timeout=None):
        launched.append(cmd)
        ms = "50.0" if "--fp8-format" in cmd else "100.0"  # the FP8 run is twice as fast
        return 0, "\n".join(iteration.format(i, ms) for i in range(1, 7))

    monkeypatch.setattr(bench, "_stream", fake_stream)
    rc = bench.main(["--configs", "tiny", "--cpu", "--fp8", "tensorwise", "--log-dir", str(tmp_path), "--quiet"])
    assert rc == 0
    assert len(launched) == 2
    assert "--fp8-format" not in launched[0]
    fp8_flags = " ".join(launched[1])
    assert "--fp8-format hybrid --fp8-recipe tensorwise --fp8-emulation" in fp8_flags  # emulated on CPU
    out = capsys.readouterr().out
    assert "tiny fp8-tensorwise" in out
    assert "tiny: FP8 (tensorwise) / bf16 tokens/s = 2.00x" in out
