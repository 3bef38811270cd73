"""benchmarks/trace_gaps.py on a hand-written trace: which gaps count and who is charged."""

import json

from benchmarks import trace_gaps


def _trace(tmp_path):
    events = [
        {"cat": "kernel", "name": "gemm", "ts": 0, "dur": 100},
        {"cat": "kernel", "name": "add", "ts": 50, "dur": 300},        # overlaps: busy until 350
        {"cat": "kernel", "name": "norm", "ts": 1350, "dur": 100},     # 1000 us gap, charged below
        {"cat": "gpu_memcpy", "name": "HtoD", "ts": 1500, "dur": 10},  # 50 us gap: too short
        {"cat": "kernel", "name": "softmax", "ts": 3510, "dur": 90},   # 2000 us gap, nothing covers it
        {"cat": "python_function", "name": "train_step", "ts": 0, "dur": 1400},
        {"cat": "cpu_op", "name": "aten::item", "ts": 360, "dur": 950},
        {"cat": "cpu_op", "name": "aten::short", "ts": 400, "dur": 10},  # covers too little
    ]
    path = tmp_path / "run" / "trace_rank0.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_gaps_and_charges(tmp_path, capsys):
    path = _trace(tmp_path)
    assert trace_gaps.find_trace(tmp_path) == path
    events = trace_gaps.load_events(path)
    idle, span = trace_gaps.gaps(events, 200)
    assert idle == [(350, 1350), (1510, 3510)] and span == 3600
    charged = trace_gaps.charge(events, idle)
    assert charged == {"aten::item < train_step": 1000, "(no CPU operation covers it)": 2000}
    trace_gaps.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "3.0 ms idle (83.3%)" in out and "1.0  aten::item < train_step" in out
