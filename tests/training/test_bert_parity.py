"""pretrain_bert trains a tiny BERT on --mock-data: the loss falls, every parallel layout
gives the single-process losses and grad norms, and a resumed run continues bit-exactly.

Tolerance (as for GPT): the layouts compute the same float32 math with sums in another
order (tensor-parallel all-reduces, data-parallel gradient averaging); that moves the
last bits and Adam carries it over the steps. 2e-5 relative on the losses (1e-4 on grad
norms) is well above that drift and far below a real error: a pooler or binary head
initialized differently on the last pipeline stage moved the sop loss by ~1e-2 at step 1.
"""

import pytest

from tests.training.bert_runs import GRAD_NORM, LM_LOSS, SOP_LOSS, run_bert, tiny_bert, values, write_vocab

ITERS, SAVED_AT = 6, 3


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("bert_vocab") / "vocab.txt")


@pytest.fixture(scope="module")
def reference(vocab, tmp_path_factory):
    """The one-process run, saving at SAVED_AT: (log, micro-batch losses, checkpoint root)."""
    root = str(tmp_path_factory.mktemp("bert_ckpt"))
    log, recorded = run_bert(1, tiny_bert(vocab) + ["--train-iters", str(ITERS), "--save", root,
                                                    "--save-interval", str(SAVED_AT)])
    return log, recorded, root


def _close(a, b, rtol):
    assert len(a) == len(b) == ITERS, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"iteration {i + 1}: {x} vs {y} (rtol {rtol})"


def test_loss_falls_and_both_losses_are_logged(reference):
    log = reference[0]
    lm, sop = values(LM_LOSS, log), values(SOP_LOSS, log)
    assert len(lm) == len(sop) == ITERS
    assert lm[-1] < lm[0] - 0.05, lm
    assert "throughput" not in log or "TFLOP/s" in log


@pytest.mark.parametrize(
    "world, extra",
    [
        (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        (2, ["--pipeline-model-parallel-size", "2"]),  # the LM head tied across stages
        (2, ["--use-distributed-optimizer"]),  # data parallel 2
    ],
    ids=["tp2-sp", "pp2", "dp2-distributed-optimizer"],
)
def test_parallel_layout_matches_single_process(reference, vocab, world, extra):
    log, _ = run_bert(world, tiny_bert(vocab) + ["--train-iters", str(ITERS)] + extra)
    ref = reference[0]
    _close(values(LM_LOSS, log), values(LM_LOSS, ref), 2e-5)
    _close(values(SOP_LOSS, log), values(SOP_LOSS, ref), 2e-5)
    _close(values(GRAD_NORM, log), values(GRAD_NORM, ref), 1e-4)


def test_resume_continues_bit_exactly(reference, vocab):
    _, uninterrupted, root = reference
    _, resumed = run_bert(1, tiny_bert(vocab) + ["--train-iters", str(ITERS), "--load", root, "--ckpt-step", str(SAVED_AT)])
    per_iteration = len(uninterrupted) // ITERS
    assert len(resumed) == (ITERS - SAVED_AT) * per_iteration
    assert resumed == uninterrupted[SAVED_AT * per_iteration:]


def test_interleaved_pipeline_matches_single_process(vocab):
    """PP2 x VPP2 (four chunks of one layer): every chunk reads the micro-batch for its padding
    mask, through its own view of the rank's data stream, and the LM head stays tied from
    the first chunk of rank 0 to the last chunk of rank 1. Same tolerance as above."""
    argv = tiny_bert(vocab) + ["--num-layers", "4", "--train-iters", "3"]
    ref, _ = run_bert(1, argv)
    log, _ = run_bert(2, argv + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"])
    for pattern, rtol in ((LM_LOSS, 2e-5), (SOP_LOSS, 2e-5), (GRAD_NORM, 1e-4)):
        got, want = values(pattern, log), values(pattern, ref)
        assert len(got) == len(want) == 3, (got, want)
        for i, (x, y) in enumerate(zip(got, want)):
            assert abs(x - y) <= rtol * abs(y), f"iteration {i + 1}: {x} vs {y} (rtol {rtol})"
