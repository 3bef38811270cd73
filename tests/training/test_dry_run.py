"""--dry-run: plans a launch from one process without a GPU; its parameter counts are those
of the model a rank really builds, and its numbers move as the layout says they should."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.training.arguments import parse_args
from megatron.training.dry_run import dry_run, plan_stages, stage_estimates
from megatron.training.model_census import rank_params

REPO = Path(__file__).resolve().parents[2]
LLAMA3_8B = [
    "--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--group-query-attention",
    "--num-query-groups", "8", "--ffn-hidden-size", "14336", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--seq-length", "8192", "--max-position-embeddings", "8192", "--micro-batch-size", "1",
    "--global-batch-size", "64", "--bf16", "--vocab-size", "128256", "--tokenizer-type", "NullTokenizer",
    "--lr", "3e-4", "--train-iters", "100", "--mock-data",
]
TINY = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "500", "--lr", "1e-3", "--train-iters", "1",
    "--mock-data", "--use-cpu-initialization",
]


def _dry_run(argv):
    import pretrain_gpt

    args = parse_args(args=list(argv) + ["--dry-run"])
    return dry_run(args, pretrain_gpt.model_provider), args


def test_llama3_8b_tp2_pp2_on_8_ranks_from_the_command_line():
    """The real entry point, one CPU process: exits 0 and reports Llama-3-8B's 8.03 B
    parameters, both pipeline stages and the per-rank split."""
    cmd = [sys.executable, "pretrain_gpt.py"] + LLAMA3_8B + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--dry-run", "--dry-run-world-size", "8"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "parameters: 8,030,261,248 total" in text
    assert "pipeline stage 0 (ranks 0, 1, 2, 3; 16 layers; embedding)" in text
    assert "pipeline stage 1 (ranks 4, 5, 6, 7; 16 layers; output layer and loss)" in text
    assert "world 8 = TP 2 x CP 1 x DP 2 x PP 2" in text
    # (8.03e9 - embedding - output layer) / 2 stages / TP 2, plus half the embedding on stage 0
    assert "parameters per rank: 2,007,629,824" in text


def _real_counts(args, pp_rank, world):
    """Parameters of the model a rank at ``pp_rank`` really builds (CPU tensors, initialized)."""
    import pretrain_gpt
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.model_setup import build_model_chunks
    from torch.testing._internal.distributed.fake_pg import FakeStore

    sizes = dict(tensor_model_parallel_size=args.tensor_model_parallel_size,
                 pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                 expert_model_parallel_size=args.expert_model_parallel_size)
    layout = parallel_state.build_layout(world, **sizes)
    rank = parallel_state.layout_groups(layout)["pp"][0][pp_rank]
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        pg = parallel_state.initialize_model_parallel(**sizes)
        model_parallel_cuda_manual_seed(1234, tp_rank=pg.rank("tp"), ep_rank=pg.rank("ep"),
                                        etp_rank=pg.rank("expt_tp"))
        chunks = build_model_chunks(pretrain_gpt.model_provider, pg, None)
        assert all(p.device.type == "cpu" for c in chunks for p in c.parameters())
        return rank_params(chunks)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


MOE = ["--num-experts", "4", "--expert-model-parallel-size", "2", "--moe-router-topk", "2"]


@pytest.mark.parametrize("tp,pp,extra", [(1, 1, []), (2, 2, []), (2, 2, ["--untie-embeddings-and-output-weights"]),
                                         (1, 2, MOE)])
def test_parameter_counts_equal_the_built_model(tp, pp, extra):
    world = tp * pp * 2
    _, args = _dry_run(TINY + extra + ["--tensor-model-parallel-size", str(tp),
                                       "--pipeline-model-parallel-size", str(pp), "--dry-run-world-size", str(world)])
    plans = plan_stages(args, __import__("pretrain_gpt").model_provider)
    assert [p.params for p in plans] == [_real_counts(args, r, world) for r in range(pp)]
    assert all(p.params.expert > 0 for p in plans) == ("--num-experts" in extra)


def test_numbers_scale_with_tp_dp_distributed_optimizer_and_recompute():
    import pretrain_gpt

    def stage0(*flags, world):
        _, args = _dry_run(TINY + list(flags) + ["--dry-run-world-size", str(world)])
        plan = plan_stages(args, pretrain_gpt.model_provider)[0]
        return plan, stage_estimates(args, plan)

    plan1, est1 = stage0(world=2)
    plan2, est2 = stage0("--tensor-model-parallel-size", "2", "--sequence-parallel", world=4)
    # TP 2 splits every matrix: a little more than half the parameters stay (norms, biases)
    assert plan1.params.total / 2 < plan2.params.total < plan1.params.total * 0.55
    assert est2["recompute None"].activations < est1["recompute None"].activations
    # DP 2 -> 4 halves only the sharded optimizer state
    _, est_dp4 = stage0(world=4)
    assert est_dp4["optimizer dist=True"].optimizer == pytest.approx(est1["optimizer dist=True"].optimizer / 2)
    assert est_dp4["optimizer dist=False"].optimizer == est1["optimizer dist=False"].optimizer
    assert est1["optimizer dist=True"].optimizer == pytest.approx(est1["optimizer dist=False"].optimizer / 2)
    assert est1["recompute full"].activations < est1["recompute None"].activations


def test_impossible_layout_fails_like_a_launch_would():
    with pytest.raises(ValueError, match="world size 6"):
        _dry_run(TINY + ["--tensor-model-parallel-size", "4", "--dry-run-world-size", "6"])
    assert torch.distributed.is_initialized() is False
