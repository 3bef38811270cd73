"""--use-torch-fsdp2 end to end on gloo: FSDP2 over two data-parallel ranks (and TP2 x
CP2) trains like one process; its torch_dcp checkpoint resumes bit-exactly, loads
resharded to one data-parallel rank, and a torch_dist checkpoint converts into one; what
cannot work is refused with the fix.

Tolerances. fp32: FSDP2 reduce-scatters each micro-batch's grads and sums the shards, so
the grad sums run in another order than one process's (as with the distributed
optimizer, tests/training/test_data_parallel_parity.py): that moves the last bits
(measured here: at most 1e-7 relative on the loss, equal printed grad norms), and the
same bound applies, 2e-5 relative on the loss and on the grad norm. A dropped reduction
moves the loss by ~1e-2 (test_dropped_reduce_scatter_fails_parity there); a grad norm
summed without the other ranks' shards is off by ~sqrt(2), and grads averaged where
per-token loss needs them summed halve it.
"""

from __future__ import annotations

import os

import pytest

from tests.training.checkpointing.ckpt_runs import run_ckpt
from tests.training.gpt_runs import grad_norms

RTOL = 2e-5
TOTAL, SAVED_AT = 6, 3
UNTIED = ["--untie-embeddings-and-output-weights"]
FSDP2 = UNTIED + ["--use-torch-fsdp2", "--ckpt-format", "torch_dcp"]


def _close(got, ref, what):
    assert len(got) == len(ref) and got, (what, got, ref)
    for i, (x, y) in enumerate(zip(got, ref)):
        assert abs(x - y) <= RTOL * abs(y), f"{what} {i + 1}: {x} vs {y} (rtol {RTOL})"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp2"))
    # The one-process run saves too (torch_dist), for the conversion test; saving does not
    # change a run (tests/training/checkpointing/test_resume.py).
    single_root = str(tmp_path_factory.mktemp("ddp"))
    single = run_ckpt(1, UNTIED + ["--save", single_root, "--save-interval", str(SAVED_AT)], TOTAL)
    single.root = single_root
    sharded = run_ckpt(2, FSDP2 + ["--save", root, "--save-interval", str(SAVED_AT)], TOTAL)
    return single, sharded, root


def test_fsdp2_over_two_ranks_matches_one_process(runs):
    single, sharded, root = runs
    # The run really was FSDP2: its checkpoint is a plain DCP directory of sharded DTensors.
    saved = os.listdir(os.path.join(root, f"iter_{SAVED_AT:07d}"))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt"} <= set(saved), saved
    assert "metadata.json" not in saved
    from megatron.training.checkpointing.checkpoint_args import read_saved_args  # --use-checkpoint-args reads it

    assert read_saved_args(os.path.join(root, f"iter_{SAVED_AT:07d}")).use_torch_fsdp2
    ref, got = single.loss_floats(), sharded.loss_floats()
    assert sorted(got) == list(range(1, TOTAL + 1))
    _close([got[i] for i in sorted(got)], [ref[i] for i in sorted(ref)], "loss")
    _close(grad_norms(sharded.log), grad_norms(single.log), "grad norm")


def test_torch_dcp_resume_is_bit_exact(runs):
    _, sharded, root = runs
    resumed = run_ckpt(2, FSDP2 + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    assert resumed.losses == {it: h for it, h in sharded.losses.items() if it > SAVED_AT}, resumed.log[-3000:]


def test_torch_dcp_loads_resharded_to_one_rank(runs):
    """Saved by two data-parallel ranks, loaded by one: the shards are reassembled, so
    training continues as the two-rank run did (to the data-parallel tolerance)."""
    _, sharded, root = runs
    resumed = run_ckpt(1, FSDP2 + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    got, ref = resumed.loss_floats(), sharded.loss_floats()
    assert sorted(got) == list(range(SAVED_AT + 1, TOTAL + 1)), resumed.log[-3000:]
    _close([got[i] for i in sorted(got)], [ref[i] for i in sorted(got)], "loss")


def test_fsdp2_with_tensor_context_parallel_and_per_token_loss_matches_one_process(runs):
    """TP2 x CP2, FSDP2 over the two cp ranks: the tp shards are what FSDP2 shards; the
    sequence-parallel norm grads are summed over tp on the shards; with per-token loss the
    grads are summed, not averaged, over the shards' ranks (a missed undo of FSDP2's
    average halves the grad norm); the layers keep their gathered weights from forward to
    backward (--torch-fsdp2-no-reshard-after-forward). Every loss token counts, so the per-token loss equals
    the reference's mean. Tolerance: as above (tp and cp reorder sums, measured within the
    same bound in test_gpt_parity)."""
    single = runs[0]
    run = run_ckpt(4, FSDP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
                          "--calculate-per-token-loss", "--torch-fsdp2-no-reshard-after-forward"], TOTAL)
    ref, got = single.loss_floats(), run.loss_floats()
    _close([got[i] for i in sorted(got)], [ref[i] for i in sorted(ref)], "loss")
    _close(grad_norms(run.log), grad_norms(single.log), "grad norm")


ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "3"]


@pytest.mark.parametrize("extra, world, names", [
    (["--ckpt-format", "torch_dcp"], 1, "--use-torch-fsdp2"),
    (FSDP2 + ["--pipeline-model-parallel-size", "2"], 2, "--pipeline-model-parallel-size 1"),
    (FSDP2 + ["--use-distributed-optimizer"], 2, "drop --use-distributed-optimizer"),
    (FSDP2 + ["--fp16"], 2, "--bf16"),
    (["--use-torch-fsdp2"], 2, "--untie-embeddings-and-output-weights"),
    (UNTIED + ["--use-torch-fsdp2", "--save", "/nonexistent", "--save-interval", "1"], 2, "--ckpt-format torch_dcp"),
    (FSDP2 + ["--load", "/nonexistent", "--ckpt-convert-format", "torch_dist", "--ckpt-convert-save", "/x"], 2,
     "--ckpt-convert-format torch_dcp"),
    (FSDP2 + ["--ckpt-megatron-lm-layout"], 2, "--ckpt-megatron-lm-layout True"),
    (UNTIED + ["--pipeline-model-parallel-size", "2", "--load", "/nonexistent", "--ckpt-convert-format", "torch_dcp",
               "--ckpt-convert-save", "/x"], 2, "convert with --pipeline-model-parallel-size 1"),
])
def test_refusals_name_the_fix(extra, world, names):
    from megatron.training.arguments import parse_and_validate

    with pytest.raises(ValueError) as error:
        parse_and_validate(ARGS + extra, world_size=world, rank=0)
    assert names in str(error.value), str(error.value)


def test_a_torch_dcp_checkpoint_is_refused_without_fsdp2(tmp_path):
    import torch

    from megatron.training.checkpointing import CheckpointError
    from megatron.training.checkpointing.torch_dcp_format import refuse_format_mismatch

    (tmp_path / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        refuse_format_mismatch(str(tmp_path), [torch.nn.Linear(2, 2)], "torch_dist")
    assert "--use-torch-fsdp2" in str(error.value)
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    refuse_format_mismatch(str(tmp_path), [torch.nn.Linear(2, 2)], "torch_dist")  # torch_dist: fine without FSDP2


def test_a_torch_dist_checkpoint_converts_to_torch_dcp_weights(runs, tmp_path):
    """--ckpt-convert-format torch_dcp from a run without FSDP2 writes the weights (only),
    and an FSDP2 run starts from them: its first loss after the load is the one-process
    run's loss at that iteration (the forward sees the same weights and samples), within
    the tolerance above; fresh weights would be off by far more."""
    single = runs[0]
    run_ckpt(1, UNTIED + ["--load", single.root, "--ckpt-step", str(SAVED_AT), "--ckpt-convert-format",
                          "torch_dcp", "--ckpt-convert-save", str(tmp_path)], TOTAL)
    converted = str(tmp_path / "torch_dcp")
    assert os.path.isfile(os.path.join(converted, f"iter_{SAVED_AT:07d}", ".metadata"))
    resumed = run_ckpt(1, FSDP2 + ["--load", converted], SAVED_AT + 1)
    got, ref = resumed.loss_floats(), single.loss_floats()
    assert sorted(got) == [SAVED_AT + 1], resumed.log[-3000:]
    _close([got[SAVED_AT + 1]], [ref[SAVED_AT + 1]], "loss")


def test_memory_estimate_shards_everything_over_data_parallel_ranks():
    """fp32 weight and grad shards (4 + 4 bytes) and Adam's moments (8), over DP 4."""
    from megatron.training.arguments import parse_and_validate
    from megatron.training.memory_estimate import RankParams, estimate_memory

    args = parse_and_validate(ARGS + FSDP2 + ["--bf16"], world_size=4, rank=0)
    estimate = estimate_memory(args, RankParams(dense=1000), [], 0, recompute=None)
    assert (estimate.weights, estimate.grads, estimate.optimizer) == (1000.0, 1000.0, 2000.0)
