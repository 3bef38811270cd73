"""FP8 under context parallelism: the amaxes are reduced over tensor x context parallel ranks.

The context-parallel ranks hold parts of the same sequences, so one process would take each
amax over all of them. A tiny RoPE GPT in the FP8 emulation (delayed scaling) on CP 2, dense
and with MoE experts (without expert parallelism the experts reduce over the same ranks),
keeps one scaling state on both ranks (the snapshot assembly refuses replicas that disagree) and
matches the one-process run: the first iteration's loss within 1e-5 relative (without the
reduction each rank scales by its own half of the sequence, 6.8e-5 off), and the inputs'
and weights' amax histories and scales within float32 noise of the one-process state. (The
output gradients on a CP rank carry the loss normalization of context parallelism, which
the gradient reduction over data x context parallel ranks undoes, so their amaxes are not
one process's; both ranks still hold the same ones.)
"""

import pytest
import torch

from tests.training.checkpointing.ckpt_runs import run_ckpt

MODEL = ["--position-embedding-type", "rope", "--group-query-attention", "--num-query-groups", "2",
         "--attention-backend", "unfused"]
FP8 = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-emulation", "--fp8-amax-history-len", "4",
       "--lr-decay-iters", "4"]


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]


@pytest.mark.parametrize("extra", [[], MOE, MOE + ["--moe-grouped-gemm"]], ids=["dense", "moe", "moe-grouped"])
def test_context_parallel_ranks_scale_as_one_process(extra):
    one = run_ckpt(1, MODEL + FP8 + extra, iters=1, snapshots=(1,))
    cp = run_ckpt(2, MODEL + FP8 + extra + ["--context-parallel-size", "2"], iters=1, snapshots=(1,))
    (x,), (y,) = (float.fromhex(v) for v in one.losses.values()), (float.fromhex(v) for v in cp.losses.values())
    assert abs(x - y) <= 1e-5 * abs(x), (x, y)
    states = [k for k in one.snapshots[1] if k.endswith((".fp8.amax_history", ".fp8.scale"))]
    assert states
    for key in states:  # the slots input and weight (the last dim)
        torch.testing.assert_close(cp.snapshots[1][key][..., :2], one.snapshots[1][key][..., :2], rtol=1e-5, atol=0)
