""""number of nan iterations" counts skipped steps whose loss or gradient norm is not
finite (an fp16 overflow skips the step with a finite loss and a NaN/Inf grad norm)."""

import math

import torch

from megatron.training.training_log import IntervalTotals, IterationStats


def _stats(loss, skipped, grad_norm):
    return IterationStats(losses={"lm loss": torch.tensor(loss)}, skipped=skipped, grad_norm=grad_norm,
                          num_zeros=None, learning_rate=1e-3, loss_scale=1.0, global_batch_size=8)


def test_skipped_steps_with_non_finite_grad_norm_or_loss_are_counted():
    totals = IntervalTotals()
    totals.add(_stats(2.0, skipped=True, grad_norm=math.nan))
    totals.add(_stats(2.0, skipped=True, grad_norm=math.inf))
    totals.add(_stats(math.nan, skipped=True, grad_norm=None))
    totals.add(_stats(2.0, skipped=True, grad_norm=1.0))  # skipped for another reason: not a NaN
    totals.add(_stats(3.0, skipped=False, grad_norm=1.0))
    assert (totals.skipped, totals.advanced, totals.nan) == (4, 1, 3)
    assert float(totals.losses["lm loss"]) == 3.0  # skipped iterations' losses are not averaged
