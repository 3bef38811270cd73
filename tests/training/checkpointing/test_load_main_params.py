"""--load-main-params-from-ckpt with --no-load-optim: the fp32 main params come from the
checkpoint (not the bf16 weights upcast), the moments start fresh; plain and distributed
optimizer."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import RankFailure
from tests.training.checkpointing.ckpt_runs import run_ckpt

MAIN = "optimizer.state.fp32_param."


def _main_params(snapshot):
    return {k: v for k, v in snapshot.items() if k.startswith(MAIN)}


@pytest.mark.parametrize("world,extra", [(1, ["--bf16"]), (2, ["--bf16", "--use-distributed-optimizer"])])
def test_main_params_come_from_the_checkpoint(tmp_path, world, extra):
    root = str(tmp_path)
    saved = run_ckpt(world, extra + ["--save", root, "--save-interval", "2"], iters=4, snapshots=(2,))
    expected = _main_params(saved.snapshots[2])
    assert expected
    load = extra + ["--load", root, "--ckpt-step", "2", "--no-load-optim"]
    read = run_ckpt(world, load + ["--load-main-params-from-ckpt"], iters=4, snapshots=("load",)).snapshots["load"]
    upcast = run_ckpt(world, load, iters=4, snapshots=("load",)).snapshots["load"]
    for key, value in expected.items():
        assert torch.equal(read[key], value), key
    # the default: the bf16 weights upcast, which lose the fp32 copy's low bits
    assert any(not torch.equal(upcast[key], value) for key, value in expected.items())
    assert all(not v.any() for k, v in read.items() if k.startswith("optimizer.state.exp_avg."))


def test_needs_no_load_optim_and_a_checkpoint_with_main_params(tmp_path):
    root = str(tmp_path)
    with pytest.raises(RankFailure, match="add --no-load-optim"):
        run_ckpt(1, ["--bf16", "--load", root, "--load-main-params-from-ckpt"], iters=4)
    run_ckpt(1, ["--bf16", "--save", root, "--save-interval", "2", "--no-save-optim", "--exit-interval", "2"], iters=4)
    with pytest.raises(RankFailure, match="holds no fp32 main params"):
        run_ckpt(1, ["--bf16", "--load", root, "--no-load-optim", "--load-main-params-from-ckpt"], iters=4)
