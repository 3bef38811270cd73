"""benchmarks/pretrain_bench.py: its log parser on real lines, its layout flags, and one whole
run of the tiny configuration on CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Printed by `python pretrain_gpt.py` on the tiny shape with --log-throughput (CPU, gloo).
REAL_ITERATION_LINE = (
    " [2026-11-22 03:19:14.590002] iteration        5/       6 | consumed samples:           20 |"
    " elapsed time per iteration (ms): 88.0 | throughput per GPU (TFLOP/s/GPU): 0.0 |"
    " learning rate: 1.666667E-04 | global batch size:     4 | lm loss: 6.111650E+00 |"
    " loss scale: 1.0 | grad norm: 0.843 | number of skipped iterations:   0 |"
    " number of nan iterations:   0 |"
)
REAL_BACKEND_LINE = (
    "[2026-11-22 03:19:08,514] INFO megatron.core.transformer.dot_product_attention:"
    " attention backend: sdpa (requested auto)"
)


def _load_bench():
    spec = importlib.util.spec_from_file_location("pretrain_bench", REPO / "benchmarks" / "pretrain_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_bench"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_parses_a_real_iteration_line():
    line = bench.parse_iteration_line(REAL_ITERATION_LINE)
    assert (line.iteration, line.ms_per_iter, line.tflops, line.loss, line.skipped) == (5, 88.0, 0.0, 6.111650, 0)
    assert bench.parse_iteration_line(REAL_BACKEND_LINE) is None


def test_measured_iterations_that_skipped_the_step_are_counted():
    """A skipped optimizer step (non-finite grads) is cheaper than a real one: the row counts
    those inside the measured window, not those of the warmup."""
    skipped = REAL_ITERATION_LINE.replace("skipped iterations:   0", "skipped iterations:   {}")
    iteration = skipped.replace("5/       6", "{}/       6")
    log = "\n".join(iteration.format(i, n) for i, n in [(1, 1), (2, 0), (3, 2), (4, 0)])
    row = bench.Row("tiny", "tp1", 32, 2, 4, 1)
    bench.fill_row(row, log, flops=1e9, warmup=1)
    assert row.skipped_iters == 2 and row.status == "ok"
    assert " skipped " in bench.table([row]).splitlines()[0]


def test_parses_the_memory_report_the_training_loop_prints(monkeypatch):
    import torch

    from megatron.training.training_log import memory_report

    mb = 1024 * 1024
    values = {"memory_allocated": 10 * mb, "max_memory_allocated": 2048 * mb,
              "memory_reserved": 30 * mb, "max_memory_reserved": 4096 * mb}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, value in values.items():
        monkeypatch.setattr(torch.cuda, name, lambda value=value: value)
    parsed = bench.parse_log("\n".join([memory_report(0, 1), REAL_BACKEND_LINE, REAL_ITERATION_LINE]))
    assert parsed.max_allocated_mb == 2048.0 and parsed.max_reserved_mb == 4096.0
    assert parsed.backends == ["attention backend: sdpa (requested auto)"]
    assert len(parsed.lines) == 1


def test_steady_state_skips_warmup_and_weights_intervals():
    lines = [bench.IterationLine(1, 500.0, None, None), bench.IterationLine(5, 100.0, None, None),
             bench.IterationLine(10, 50.0, None, None), bench.IterationLine(12, 80.0, None, None)]
    # warmup 5: the line at 5 covers iterations 2-5 and is dropped; 6-10 at 50 ms, 11-12 at 80 ms.
    ms, _, measured = bench.steady_state(lines, warmup=5)
    assert measured == 7 and ms == pytest.approx((5 * 50 + 2 * 80) / 7)
    assert bench.steady_state(lines, warmup=12) == (None, None, 0)


def test_flops_follow_megatrons_formula_for_the_tiny_shape():
    cfg = bench.CONFIGS["tiny"]
    flags = bench.pretrain_flags(cfg, bench.Layout(1), 128, 2, 4, 6, 1, True, [])
    # s=128, L=2, h=64, f=256, n=g=4, d=16, V=512: per token 12*h*f*L + 12*L*h*q*2 + 6*L*q*s + 6*h*V.
    per_token = 12 * 64 * 256 * 2 + 12 * 2 * 64 * 64 * 2 + 6 * 2 * 64 * 128 + 6 * 64 * 512
    assert bench.run_shape(flags, 1) == (4 * 128 * per_token, 128, 4)


def test_layout_flags_and_data_parallel_size():
    layout = bench.Layout(16, tp=2, pp=2, vpp=3, cp=2, distributed_optimizer=True, recompute="full", overlap=True)
    assert layout.dp == 2
    flags = " ".join(layout.flags())
    for expected in ["--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2",
                     "--num-virtual-stages-per-pipeline-rank 3", "--context-parallel-size 2",
                     "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce",
                     "--overlap-param-gather", "--recompute-granularity full", "--recompute-method uniform"]:
        assert expected in flags
    with pytest.raises(ValueError, match="--nproc 6 .* --tp 4"):
        _ = bench.Layout(6, tp=4).dp


def test_extra_flags_come_last_so_they_win():
    flags = bench.pretrain_flags(bench.CONFIGS["tiny"], bench.Layout(1), 128, 2, 4, 6, 1, True, ["--lr", "1e-2"])
    assert flags[-2:] == ["--lr", "1e-2"]
    # The row's shape is the run's, also when raw flags change it.
    overridden = bench.pretrain_flags(bench.CONFIGS["tiny"], bench.Layout(1), 128, 2, 4, 6, 1, True,
                                      ["--seq-length", "64", "--global-batch-size", "8"])
    _, seq, gbs = bench.run_shape(overridden, 1)
    assert (seq, gbs) == (64, 8)


def test_tiny_config_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pretrain_bench.py"), "--configs", "tiny", "--cpu",
         "--json", str(out), "--log-dir", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["config"] == "tiny"
    assert row["iters_measured"] == 4  # 6 iterations, the first 2 are warmup
    assert row["ms_per_iter"] > 0 and row["tokens_per_s"] > 0
    assert row["tokens_per_s"] == pytest.approx(4 * 128 / (row["ms_per_iter"] / 1000))
    assert 0 < row["mfu"] < 1 and row["mfu"] == pytest.approx(row["tflops_per_gpu"] / 989.4)
    assert "sdpa" in row["backends"]
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    last_lines = proc.stdout.strip().splitlines()[-2:]
    assert last_lines[0].split()[:3] == ["config", "layout", "seq"] and last_lines[1].startswith("tiny")


def test_profile_flags_and_profiled_iterations_left_out(monkeypatch, tmp_path):
    opts = bench.parse_cli(["--configs", "tiny", "--cpu", "--profile", "--log-dir", str(tmp_path)])
    assert opts.profile_steps == (4, 5)  # warmup 2 + 2, + 3
    assert bench.parse_cli(["--configs", "tiny", "--cpu", "--profile-steps", "3:3",
                            "--log-dir", str(tmp_path)]).profile_steps == (3, 3)
    for bad in (["--profile-steps", "5"], ["--profile-steps", "5:4"], ["--profile-steps", "6:7"],
                ["--profile", "--warmup", "4"]):
        with pytest.raises(SystemExit):
            bench.parse_cli(["--configs", "tiny", "--cpu", "--log-dir", str(tmp_path)] + bad)

    iteration = REAL_ITERATION_LINE.replace("5/       6", "{}/       6").replace("88.0", "{}")
    log = "\n".join([iteration.format(1, "500.0"), iteration.format(2, "40.0"), iteration.format(3, "30.0"), iteration.format(4, "90.0"),
                     ("[Rank 0] profile of iterations 4-5: kernel time 1.0 ms/iteration, attention kernels 0.2 "
                      "ms/iteration (20.0%)"),
                     "[Rank 0] profile | GPU busy 80.0% of wall, idle 0.2 ms/iteration",
                     iteration.format(5, "900.0"), iteration.format(6, "7000.0"), iteration.format(7, "60.0")])
    launched = []

    def fake_stream(cmd, log_path, quiet, timeout=None):
        launched.append(cmd)
        return 0, log

    monkeypatch.setattr(bench, "_stream", fake_stream)
    row = bench.run_one("tiny", opts)
    flags = " ".join(launched[0])
    assert "--profile --use-pytorch-profiler --profile-step-start 4 --profile-step-end 5" in flags
    assert f"--tensorboard-dir {tmp_path / 'profile_tiny'}" in flags
    # Iterations 4 and 5 were profiled and 6 wrote the trace: only 3 and 7 are averaged.
    assert (row.iters_measured, row.ms_per_iter) == (2, 45.0)
    assert row.profile == log.splitlines()[4:6]
    ms, _, measured = bench.steady_state(bench.parse_log(log).lines, warmup=2)
    assert measured == 5 and ms == pytest.approx((30 + 90 + 900 + 7000 + 60) / 5)


def test_timeout_kills_the_whole_run_and_keeps_its_output(tmp_path):
    """--timeout: a run that outlives it is stopped with its children (a torchrun's workers
    would otherwise hold the GPUs), reports TIMED_OUT and keeps the lines it logged."""
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "print('iteration line before the timeout', flush=True)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    rc, text = bench._stream([sys.executable, "-c", script], tmp_path / "run.log", quiet=True, timeout=3)
    assert rc == bench.TIMED_OUT
    assert time.monotonic() - start < 30
    assert "iteration line before the timeout" in text
    child = int(pid_file.read_text())
    for _ in range(50):  # the kernel reaps the orphaned child shortly after the kill
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child process {child} of the timed-out run is still alive")
    rc, text = bench._stream([sys.executable, "-c", "print('done')"], tmp_path / "ok.log", quiet=True, timeout=30)
    assert (rc, text.strip()) == (0, "done")
