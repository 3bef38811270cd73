"""vocab_parallel_cross_entropy on TP = 2 and 4 equals torch's cross entropy on full logits.

Each rank holds its vocabulary slice of the same full logits; per-token losses and the
logit gradients (slices reassembled) are compared with
``torch.nn.functional.cross_entropy(..., reduction='none', label_smoothing=eps)``.

Tolerance: fp32 logits of std 3 over V = 32; the parallel version reorders the sum of
exponentials (per-shard sums, then an all-reduce) and subtracts the global max, so losses
differ by a few ulps of log-sum-exp (~4, ulp 4.8e-7) and gradients (in [-1, 1]) by a few
ulps of 1: RTOL 1e-6, ATOL 2e-6. A missing all-reduce changes the loss by O(1).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from tests.multirank import run_on_ranks

RTOL, ATOL = 1e-6, 2e-6
S, B, V = 6, 3, 32
SMOOTHINGS = (0.0, 0.1)


def _logits():
    return 3.0 * torch.randn(S, B, V, generator=torch.Generator().manual_seed(7))


def _target():
    return torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(8))


def _loss_weights():
    """A non-uniform upstream gradient, so backward's scaling by grad_output is checked."""
    return torch.rand(S, B, generator=torch.Generator().manual_seed(9))


def _parallel(rank, world, group, label_smoothing):
    logits = _logits().chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, _target(), group, label_smoothing=label_smoothing)
    (loss * _loss_weights()).sum().backward()
    return dict(loss=loss.detach(), grad=logits.grad)


def _ce_on_rank(rank, world):
    groups = parallel_state.initialize_model_parallel(world)
    return {eps: _parallel(rank, world, groups.tp, eps) for eps in SMOOTHINGS}


def _reference(label_smoothing):
    logits = _logits().requires_grad_()
    loss = F.cross_entropy(
        logits.view(-1, V), _target().view(-1), reduction="none", label_smoothing=label_smoothing
    ).view(S, B)
    (loss * _loss_weights()).sum().backward()
    return dict(loss=loss.detach(), grad=logits.grad)


def _check(results, label_smoothing):
    ref = _reference(label_smoothing)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res[label_smoothing]["loss"], ref["loss"], rtol=RTOL, atol=ATOL)
    grad = torch.cat([res[label_smoothing]["grad"] for res in results], dim=-1)
    torch.testing.assert_close(grad, ref["grad"], rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def tp_results(request):
    return run_on_ranks(_ce_on_rank, request.param)


@pytest.mark.parametrize("label_smoothing", SMOOTHINGS)
def test_vocab_parallel_cross_entropy_matches_torch(tp_results, label_smoothing):
    _check(tp_results, label_smoothing)


@pytest.mark.parametrize("label_smoothing", SMOOTHINGS)
def test_single_rank_matches_torch(label_smoothing):
    _check([{label_smoothing: _parallel(0, 1, None, label_smoothing)}], label_smoothing)


def test_half_precision_logits_compute_in_fp32():
    logits = _logits().to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, _target(), None)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.detach().float().view(-1, V), _target().view(-1), reduction="none").view(S, B)
    # the inputs are the same bf16 values, the math is fp32 in both: fp32 tolerance
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)


def test_caller_logits_are_not_modified_and_views_work():
    logits = _logits()
    before = logits.clone()
    loss = vocab_parallel_cross_entropy(logits, _target(), None)
    assert torch.equal(logits, before)
    transposed = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [s, b, V] view of [b, s, V]
    assert not transposed.is_contiguous()
    assert torch.equal(vocab_parallel_cross_entropy(transposed, _target(), None), loss)


def test_label_smoothing_passed_positionally_is_refused():
    with pytest.raises(TypeError, match="label_smoothing by keyword"):
        vocab_parallel_cross_entropy(_logits(), _target(), 0.1)
