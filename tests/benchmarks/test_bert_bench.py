"""The bert-large configuration of benchmarks/pretrain_bench.py: it launches pretrain_bert.py
with a WordPiece vocabulary of BERT's size and counts BERT's FLOPs (bidirectional attention)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("pretrain_bench_bert", REPO / "benchmarks" / "pretrain_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_bench_bert"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_bert_large_runs_pretrain_bert_with_bert_flops():
    cfg = bench.CONFIGS["bert-large"]
    assert "bert-large" not in bench.SINGLE_GPU_CONFIGS  # named explicitly, not part of "all"
    flags = bench.pretrain_flags(cfg, bench.Layout(1), 512, 16, 64, 10, 1, False, [])
    assert flags[flags.index("--tokenizer-type") + 1] == "BertWordPieceLowerCase"
    vocab = Path(flags[flags.index("--vocab-file") + 1]).read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) - 1 == 30522
    assert bench.launch_command(1, flags, cfg.family)[1].endswith("pretrain_bert.py")
    flops, seq, gbs = bench.run_shape(flags, 1, cfg.family)
    L, h, s, V, B = 24, 1024, 512, 30592, 64  # vocab padded to a multiple of 128
    # 12·L·h·4h (MLP) + 24·L·h² (QKV, proj) + 12·L·h·s (full attention core) + 6h² (LM-head
    # dense) + 6hV (logits) per token; 6(h² + 2h) (pooler, binary head) per sequence
    per_token = 48 * L * h * h + 24 * L * h * h + 12 * L * h * s + 6 * h * h + 6 * h * V
    assert (seq, gbs) == (512, 64)
    assert flops == B * (s * per_token + 6 * (h * h + 2 * h))


def test_bert_tiny_smoke_runs_the_bert_path_on_cpu_with_bert_flops(tmp_path):
    """The bert-large path (pretrain_bert.py, WordPiece mock data, padding-mask attention,
    BERT's FLOPs in TFLOP/s and MFU) end to end at a CPU size, so a GPU run of bert-large does
    not stop on an error of the driver."""
    import json
    import subprocess

    import pytest

    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pretrain_bench.py"), "--configs", "bert-tiny", "--cpu",
         "--json", str(out), "--log-dir", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["config"] == "bert-tiny" and "sdpa" in row["backends"]
    cfg = bench.CONFIGS["bert-tiny"]
    flags = bench.pretrain_flags(cfg, bench.Layout(1), cfg.seq, cfg.mbs, cfg.gbs, 6, 1, False, [])
    flops, _, _ = bench.run_shape(flags, 1, "bert")
    assert row["tflops_per_gpu"] == pytest.approx(flops / (row["ms_per_iter"] / 1000) / 1e12, rel=1e-3)
    assert (tmp_path / "bert-tiny.log").read_text().count("lm loss") >= 6
