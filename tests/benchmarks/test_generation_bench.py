"""benchmarks/generation_bench.py runs end to end on the tiny shape on CPU (the GPU numbers
are measured by hand; see docs/performance.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("generation_bench", REPO / "benchmarks" / "generation_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_generation_bench_runs_on_cpu(capsys):
    rows = _bench().main(["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "2",
                       "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"])
    assert [(r["impl"], r["batch"]) for r in rows] == [("ours eager", 2), ("hf dynamic", 2)]
    assert all(r["prefill_tok_s"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert "WARNING" not in capsys.readouterr().out  # fp32: the same greedy tokens as transformers


def test_gemv_table_refuses_a_cpu_run():
    with pytest.raises(SystemExit):
        _bench().main(["--shape", "tiny", "--device", "cpu", "--gemv"])
