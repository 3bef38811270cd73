"""What a run tells its user: TensorBoard timers/throughput/world-size scalars, progress.txt,
evaluation progress lines, the start-up summary, --help defaults, and evaluation-only runs
(--skip-train) that need only the flags evaluation needs."""

from __future__ import annotations

import re

import pytest

from megatron.training.arguments import build_parser, parse_and_validate
from megatron.training.evaluation import progress_every, progress_line
from megatron.training.memory_estimate import MemoryEstimate
from megatron.training.startup_summary import summary_lines
from megatron.training.training_log import format_duration, memory_scalars
from tests.multirank import run_on_ranks
from tests.training.gpt_runs import TINY_GPT, _run_pretrain, run_gpt


def _scalar_tags(directory):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(directory))
    acc.Reload()
    return acc, set(acc.Tags()["scalars"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with every report on; saved at iterations 2 and 3."""
    root = tmp_path_factory.mktemp("reports")
    log = run_gpt(1, ["--tensorboard-dir", str(root / "tb"), "--log-throughput", "--log-timers-to-tensorboard",
                      "--timing-log-level", "1", "--log-memory-to-tensorboard", "--log-world-size-to-tensorboard",
                      "--log-progress", "--save", str(root / "ckpt"), "--save-interval", "2",
                      "--eval-iters", "4", "--log-interval", "1"], iters=3)
    return root, log


def test_tensorboard_gets_timers_throughput_and_world_size(trained):
    root, _ = trained
    acc, tags = _scalar_tags(root / "tb")
    assert {"iteration-time", "forward-backward-time", "optimizer-time", "throughput", "tokens-per-second",
            "tokens-per-second-per-gpu", "world-size"} <= tags, tags
    assert [e.step for e in acc.Scalars("throughput")] == [1, 2, 3]
    assert all(e.value > 0 for e in acc.Scalars("tokens-per-second"))
    # memory scalars come from the CUDA allocator: none on a CPU run, and no error
    assert not any(tag.startswith("mem-") for tag in tags) and memory_scalars() == {}


def test_progress_file_records_start_saves_and_exit(trained):
    root, _ = trained
    lines = (root / "ckpt" / "progress.txt").read_text().splitlines()
    events = [line.split("\t")[3] for line in lines]
    assert events == ["Starting job", "Saved checkpoint", "Saved checkpoint", "Exiting job"], lines
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\tJob ID: [^\t]*\t# GPUs: 1\t", line) for line in lines)
    saved = lines[1].split("\t")
    assert saved[4] == "Iteration: 2" and saved[5].startswith("Job throughput: ")
    assert saved[6].startswith("Cumulative throughput: ") and saved[7].startswith("Floating-point operations: ")
    # 2 iterations x 8 samples x 32 tokens
    assert saved[8] == f"Tokens (in billions): {2 * 8 * 32 / 1e9:.2f}"


def test_evaluation_prints_progress_then_megatrons_block(trained):
    _, log = trained
    progress = [line for line in log.splitlines() if line.startswith(" evaluating validation:")]
    assert [line.split()[2] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    block = log.index(" validation loss at iteration 3 on validation set | lm loss value:")
    assert log.index(progress[-1]) < block
    assert log.count(" evaluating test: 4/4 batches") == 1


def test_progress_line_format():
    assert progress_every(100) == 10 and progress_every(5) == 1
    assert progress_line("validation", 20, 100, 12.0) == (
        " evaluating validation: 20/100 batches | elapsed: 12.0 s | ETA: 0:00:48 |")
    assert format_duration(3600 * 31 + 65) == "31:01:05"


def test_skip_train_evaluates_a_checkpoint_without_training_flags(trained):
    """Eval-only from the saved run: no --lr, no --train-iters; nothing is trained or saved."""
    root, _ = trained
    argv = [a for a in TINY_GPT]
    for flag, n in (("--lr", 1), ("--min-lr", 1), ("--lr-decay-style", 1), ("--lr-warmup-iters", 1),
                    ("--eval-iters", 1)):
        i = argv.index(flag)
        del argv[i:i + 1 + n]
    log = run_on_ranks(_run_pretrain, 1, args=(argv + ["--skip-train", "--eval-iters", "2", "--load",
                                                       str(root / "ckpt")], None), timeout=300)[0]
    assert "skipping training (--skip-train)" in log
    assert " validation loss at iteration 3 on validation set | lm loss value:" in log
    assert " test loss at iteration 3 on test set" in log
    assert " iteration        1/" not in log
    # from scratch, too
    log = run_on_ranks(_run_pretrain, 1, args=(argv + ["--skip-train", "--eval-iters", "1"], None), timeout=300)[0]
    assert " validation loss at iteration 0 on validation set" in log


def test_help_shows_each_default_and_keeps_the_groups():
    text = build_parser().format_help()
    assert re.search(r"--eval-iters EVAL_ITERS\s+Batches averaged per evaluation\. \(default: 100\)", text)
    assert re.search(r"--log-interval LOG_INTERVAL[^-]*\(default: 100\)", text)
    assert "\nlogging:\n" in text and "\ndry run:\n" in text


def test_startup_summary_names_shape_layout_precision_flops_and_memory():
    args = parse_and_validate(TINY_GPT + ["--train-iters", "1", "--bf16", "--tensor-model-parallel-size", "2",
                                          "--use-distributed-optimizer"], world_size=4)
    args.padded_vocab_size = 512
    lines = summary_lines(args, 134912, 34816, 70000, "rank 0 (tp 0, pp 0)",
                          MemoryEstimate(2 * 2**30, 4 * 2**30, 3 * 2**20, 2**30))
    text = "\n".join(lines)
    assert "2 layers, hidden 64, ffn 256, 4 heads (kv channels 16)" in text
    assert "134,912 total" in text and "70,000 on rank 0 (tp 0, pp 0)" in text
    assert "world 4 = TP 2 x CP 1 x DP 2 x PP 1" in text
    assert "bf16 params, fp32 grads, fp32 main params, adam optimizer (distributed optimizer)" in text
    assert "FLOPs per iteration: " in text
    assert "weights 2.00 GiB | grads 4.00 GiB | optimizer 3.0 MiB | activations 1.00 GiB | total 7.00 GiB" in text


def test_cumulative_throughput_counts_from_the_first_job_with_the_same_gpus(tmp_path, monkeypatch):
    """A resumed job: job throughput from its own start, cumulative from the earlier job's
    `Starting job` line (same GPU count); a job on another GPU count is not the start."""
    import argparse
    import time as time_module
    from datetime import datetime, timedelta

    from megatron.training import progress_log

    now = datetime(2026, 1, 2, 12, 0, 0)
    earlier = (now - timedelta(seconds=1000)).strftime("%Y-%m-%d %H:%M:%S")
    even_earlier = (now - timedelta(seconds=5000)).strftime("%Y-%m-%d %H:%M:%S")
    (tmp_path / "progress.txt").write_text(
        f"{even_earlier}\tJob ID: 1\t# GPUs: 4\tStarting job\tFloating-point operations: 0.000000e+00\n"
        f"{earlier}\tJob ID: 2\t# GPUs: 2\tStarting job\tFloating-point operations: 1.000000e+15\n")
    clock = {"t": now.timestamp()}
    monkeypatch.setattr(time_module, "time", lambda: clock["t"])
    args = argparse.Namespace(log_progress=True, save=str(tmp_path), world_size=2, seq_length=1000,
                              num_floating_point_operations_so_far=3e15)
    log = progress_log.ProgressLog(args)
    clock["t"] += 100.0
    log.saved_checkpoint(10, 5e15, consumed_samples=2_000_000)
    fields = (tmp_path / "progress.txt").read_text().splitlines()[-1].split("\t")
    # job: 2e15 FLOPs / 100 s / 2 GPUs; cumulative: 4e15 FLOPs / 1100 s / 2 GPUs
    assert fields[5] == "Job throughput: 10.0 TFLOP/s/GPU"
    assert fields[6] == f"Cumulative throughput: {4e15 / 1100 / 2 / 1e12:.1f} TFLOP/s/GPU"
    assert fields[8] == "Tokens (in billions): 2.00"
