"""FP8 `delayed` scaling on data-parallel replicas: one scaling state, and a bit-exact resume.

Each replica takes its amaxes from its own micro-batches; after every step's forward and
backward their histories and scales are merged (``fp8.replica_sync``), so all replicas hold
the state a checkpoint stores. Two replicas (dense, and MoE with grouped experts whose
states merge over the expert-data-parallel ranks) in the FP8 emulation: the snapshot
assembly refuses replicas that disagree, and a run resumed from its step-2 checkpoint
continues with the uninterrupted run's losses and state, bit for bit. Without the merge the
replicas' states differ and the resumed run gives every replica the saving rank's state.
"""

import pytest

from tests.training.checkpointing.ckpt_runs import assert_same_tensors, run_ckpt

FP8 = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-emulation", "--fp8-amax-history-len", "4",
       "--fp8-amax-compute-algo", "max", "--lr-decay-iters", "8"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--moe-grouped-gemm"]


@pytest.mark.parametrize("extra", [[], MOE], ids=["dense", "moe-grouped"])
def test_replicas_share_one_state_and_resume_bit_exactly(tmp_path, extra):
    save = ["--save", str(tmp_path), "--save-interval", "2", "--ckpt-format", "torch_dist"]
    whole = run_ckpt(2, FP8 + extra, iters=4, snapshots=(4,))
    run_ckpt(2, FP8 + extra + save + ["--exit-interval", "2"], iters=4)
    resumed = run_ckpt(2, FP8 + extra + ["--load", str(tmp_path), "--ckpt-format", "torch_dist"], iters=4,
                       snapshots=(4,))
    assert resumed.losses == {k: v for k, v in whole.losses.items() if k > 2}
    assert_same_tensors(whole.snapshots[4], resumed.snapshots[4])
