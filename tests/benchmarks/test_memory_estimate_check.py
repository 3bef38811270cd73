"""benchmarks/memory_estimate_check.py: the flags of each run and the final table (the GPU
measurement itself runs only on a GPU machine)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("memory_estimate_check", REPO / "benchmarks" / "memory_estimate_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load()


def _value(flags, name):
    return flags[flags.index(name) + 1]


def test_each_run_is_a_few_iterations_of_the_reference_shape_in_bf16():
    flags = check.config_flags("llama-1.6b", 3, None, None, cpu=False)
    assert _value(flags, "--train-iters") == "3" and "--bf16" in flags
    assert _value(flags, "--num-layers") == "24" and _value(flags, "--seq-length") == "4096"
    assert _value(flags, "--recompute-granularity") == "selective"  # the configuration's own
    assert _value(flags, "--global-batch-size") == str(4 * int(_value(flags, "--micro-batch-size")))
    full = check.config_flags("llama-1.6b", 3, "full", 1, cpu=False)
    assert _value(full, "--recompute-granularity") == "full" and _value(full, "--micro-batch-size") == "1"


def test_table_gives_the_ratio_and_keeps_failed_rows():
    gib = 1 << 30
    rows = [{"config": "gpt-350m", "status": "ok", "params": 354_871_296, "weights": 1 * gib, "grads": 2 * gib,
             "optimizer": 6 * gib, "activations": 11 * gib, "total": 20 * gib, "measured": 22 * gib},
            {"config": "gpt-1.7b", "status": "timed out after 600 s"}]
    text = check.table(rows)
    assert "gpt-350m" in text and "354,871,296" in text and " 20.00 " in text and " 22.00 " in text
    assert "1.100" in text
    assert "gpt-1.7b" in text and "timed out after 600 s" in text
