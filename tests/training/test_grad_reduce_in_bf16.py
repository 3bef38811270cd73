"""--grad-reduce-in-bf16: on DP2 the gradient buffers are bf16 (accumulated and reduced in
bf16) while the optimizer steps fp32 main grads, and training matches fp32 reduction to
bf16 precision."""

import pytest
import torch

from megatron.training.arguments import parse_and_validate
from tests.multirank import run_on_ranks
from tests.training import gpt_runs

BF16_DP2 = ["--bf16", "--use-distributed-optimizer"]


def _run_reporting_grad_dtype(rank, world_size, argv):
    gpt_runs._capture_model()
    log = gpt_runs._run_pretrain(rank, world_size, argv)
    chunk = gpt_runs._CAPTURED["model"][0]
    return log, {p.main_grad.dtype for p in chunk.parameters() if hasattr(p, "main_grad")}


def _run(extra):
    argv = gpt_runs.TINY_GPT + ["--train-iters", "3"] + BF16_DP2 + extra
    return run_on_ranks(_run_reporting_grad_dtype, 2, args=(argv,), timeout=300)[-1]


def test_bf16_reduction_matches_fp32_reduction_on_dp2():
    fp32_log, fp32_dtypes = _run([])
    bf16_log, bf16_dtypes = _run(["--grad-reduce-in-bf16"])
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    ref, got = gpt_runs.losses(fp32_log), gpt_runs.losses(bf16_log)
    assert len(ref) == len(got) == 3
    # bf16 keeps 8 bits of mantissa: one rounding of each reduced gradient moves the
    # gradient norm by well under 1% and the next losses by a few thousandths.
    assert got == pytest.approx(ref, abs=1e-2)
    assert gpt_runs.grad_norms(bf16_log) == pytest.approx(gpt_runs.grad_norms(fp32_log), rel=1e-2)


def test_grad_reduce_in_bf16_turns_off_fp32_accumulation_as_megatron_does():
    base = "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 " \
           "--micro-batch-size 2 --bf16".split()
    assert parse_and_validate(base).accumulate_allreduce_grads_in_fp32 is True
    args = parse_and_validate(base + ["--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"])
    assert args.accumulate_allreduce_grads_in_fp32 is False
