"""benchmarks/attention_mask_bench.py on CPU: every mask form gets a row, and a backend that
refuses the call is reported as refused instead of stopping the table."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import attention_mask_bench as bench  # noqa: E402


def test_cpu_table_has_a_row_per_dropout_and_mask(capsys):
    assert bench.main(["--cpu", "--dropout", "0.0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.0 |")]
    assert [r.split(" | ")[1] for r in rows] == list(bench.masks(1, 1, 4, torch.float32, "cpu"))
    assert all(" ms" in r for r in rows)


def test_key_masks_hide_the_same_keys():
    forms = bench.masks(3, 2, 40, torch.float32, "cpu")
    hidden = ~forms["bool key mask"]
    assert hidden.any() and torch.equal(torch.isinf(forms["additive key mask"]), hidden)
    assert forms["additive [b,h,s,s]"].shape == (3, 2, 40, 40)


def test_a_refusing_backend_is_named_not_raised():
    q = torch.randn(1, 1, 8, 8, requires_grad=True)
    # cuDNN attention has no CPU kernel
    assert bench.row(q, q, q, None, 0.0, [bench.FORCED["cudnn"]], 1).startswith("refused: ")
