"""The MoE metrics tracker adds into tensors it keeps for the whole run and zeroes them in
place, so a CUDA graph captured with them keeps reporting into what the loop reads."""

import torch

from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker


def test_clear_zeroes_the_same_tensors_in_place():
    tracker = MoEMetricsTracker()
    tracker.record("load_balancing_loss", torch.tensor(2.0), layer_number=2, num_layers=3)
    tracker.record("load_balancing_loss", torch.tensor(0.5), layer_number=2, num_layers=3)
    tracker.record_tokens(1, torch.tensor([3.0, 1.0]))
    tracker.record_tokens(1, torch.tensor([1.0, 1.0]))
    values, counts = tracker.metrics["load_balancing_loss"].values, tracker.tokens_per_expert[0]
    assert values.tolist() == [0.0, 2.5, 0.0] and counts.tolist() == [4.0, 2.0]
    tracker.clear()
    assert tracker.metrics["load_balancing_loss"].values is values and tracker.tokens_per_expert[0] is counts
    assert values.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0.0, 0.0]
    # the next iteration's values land in the kept tensors
    tracker.record("load_balancing_loss", torch.tensor(1.0), layer_number=1, num_layers=3)
    tracker.record_tokens(1, torch.tensor([0.0, 2.0]))
    assert values.tolist() == [1.0, 0.0, 0.0] and counts.tolist() == [0.0, 2.0]
