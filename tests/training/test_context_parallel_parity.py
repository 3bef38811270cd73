"""Context parallelism (alone and with TP+SP, DP + distributed optimizer, PP) trains like one process.

A tiny RoPE GPT (seq 32, GQA) trains for 6 iterations on one process and on each layout
with --context-parallel-size 2; the losses and grad norms must agree.

Tolerance: with --use-cpu-initialization every layout starts from the same weights and
reads the same samples. Context parallelism changes only the order of float32 sums
(attention softmax merged over K/V blocks by log-sum-exp, gradients summed over ranks and
ring steps), ~1e-7 relative per step, which Adam carries forward. 2e-5 relative on the
loss (as in test_gpt_parity / test_pipeline_parity) is far above that and far below a
real error: feeding the attention the wrong chunk order (test_wrong_chunk_order_fails)
moves the loss by ~5e-5 relative at the first step and ~2.5e-4 by the second (a tiny
random-init model depends little on token order), more than 10x the tolerance. Grad norms are printed with 3 decimals, so 1e-4
relative on them means equal as printed.
"""

import pytest

from tests.training.gpt_runs import grad_norms, losses, run_gpt, run_gpt_with_params

RTOL = 2e-5
ITERS = 6
MODEL = ["--position-embedding-type", "rope", "--group-query-attention", "--num-query-groups", "2",
         "--attention-backend", "unfused"]
CP2 = ["--context-parallel-size", "2"]


@pytest.fixture(scope="module")
def reference_log():
    return run_gpt(1, MODEL, iters=ITERS)


def _close(a, b, rtol, n=ITERS):
    assert len(a) == len(b) == n, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"entry {i + 1}: {x} vs {y} (rtol {rtol})"


@pytest.mark.parametrize(
    "world, extra",
    [
        (2, CP2),
        (4, CP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        (4, CP2 + ["--use-distributed-optimizer"]),
        (4, CP2 + ["--pipeline-model-parallel-size", "2"]),
    ],
    ids=["cp2-p2p", "cp2xtp2-sp", "cp2xdp2-distopt", "cp2xpp2"],
)
def test_context_parallel_matches_single_process(reference_log, world, extra):
    log = run_gpt(world, MODEL + extra, iters=ITERS)
    _close(losses(log), losses(reference_log), RTOL)
    _close(grad_norms(log), grad_norms(reference_log), 1e-4)


def contiguous_cp_slices():
    """Planted bug: get_batch gives CP rank i the i-th contiguous part of the sequence while
    attention and RoPE assume chunks i and 2CP-1-i."""
    import pretrain_gpt
    from megatron.core import process_groups

    def wrong(batch, cp_group=None):
        cp, rank = process_groups.group_size(cp_group), process_groups.group_rank(cp_group)
        return {k: None if v is None else v.chunk(cp, dim=1)[rank].contiguous() for k, v in batch.items()}

    pretrain_gpt.get_batch_on_this_cp_rank = wrong


def test_wrong_chunk_order_fails(reference_log):
    log, _, _ = run_gpt_with_params(2, MODEL + CP2, iters=3, patch=contiguous_cp_slices)
    got, want = losses(log), losses(reference_log)[:3]
    assert len(got) == 3
    assert max(abs(x - y) / abs(y) for x, y in zip(got, want)) > 5 * RTOL, (got, want)


def mask_every_fifth_token_id():
    """Loss mask off where the token id is a multiple of 5 (before the CP split), so CP
    ranks hold different token counts: the loss must be divided by the whole count."""
    import pretrain_gpt

    original = pretrain_gpt.get_batch_on_this_cp_rank

    def masked(batch, cp_group=None):
        keep = (batch["tokens"] % 5 != 0).to(batch["loss_mask"].dtype)
        return original({**batch, "loss_mask": batch["loss_mask"] * keep}, cp_group)

    pretrain_gpt.get_batch_on_this_cp_rank = masked


def test_uneven_loss_mask_matches_single_process():
    ref, _, _ = run_gpt_with_params(1, MODEL, iters=3, patch=mask_every_fifth_token_id)
    log, _, _ = run_gpt_with_params(2, MODEL + CP2, iters=3, patch=mask_every_fifth_token_id)
    _close(losses(log), losses(ref), RTOL, n=3)
    _close(grad_norms(log), grad_norms(ref), 1e-4, n=3)
