"""benchmarks/pretrain_bench.py --fsdp2: the row that times FSDP2 next to the distributed
optimizer passes flags the framework accepts, and is labelled as FSDP2."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("pretrain_bench_fsdp2", REPO / "benchmarks" / "pretrain_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_bench_fsdp2"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_fsdp2_row_flags_pass_validation():
    from megatron.training.arguments import parse_and_validate

    layout = bench.Layout(8, tp=2, fsdp2=True)
    flags = bench.pretrain_flags(bench.CONFIGS["gpt-1.7b"], layout, 4096, 1, 64, 30, 5, False, [])
    assert "--use-torch-fsdp2" in flags and "--use-distributed-optimizer" not in flags
    assert bench.describe_layout(layout) == "tp2 pp1 cp1 dp4 fsdp2"
    args = parse_and_validate(flags, world_size=8, rank=0)
    assert args.use_torch_fsdp2 and args.untie_embeddings_and_output_weights


def test_fsdp2_with_the_distributed_optimizer_is_refused():
    with pytest.raises(SystemExit):
        bench.parse_cli(["--configs", "tiny", "--fsdp2", "--distributed-optimizer"])
