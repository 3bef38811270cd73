"""Megatron-Core's state-dict checkpoint API (``dist_checkpointing.save``/``load``,
``ShardedTensor.from_rank_offsets``, models' ``sharded_state_dict``) on one process."""

import pytest
import torch

from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig


def test_from_rank_offsets():
    chunk = ShardedTensor.from_rank_offsets("w", torch.zeros(2, 3), (0, 1, 4), replica_id=1)
    assert chunk.global_shape == (8, 3) and chunk.global_offset == (2, 0)
    stacked = ShardedTensor.from_rank_offsets("w", torch.zeros(3), (0, 2, 5), prepend_axis_num=1)
    assert stacked.global_shape == (5, 3) and stacked.global_offset == (2, 0)
    with pytest.raises(ValueError, match="outside"):
        ShardedTensor.from_rank_offsets("w", torch.zeros(2), (0, 4, 4))


def _model(seed):
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, gated_linear_unit=True)
    return GPTModel(config, vocab_size=64, max_sequence_length=16)


def test_model_round_trip_with_common_state(tmp_path):
    trained, fresh = _model(1), _model(2)
    state = trained.sharded_state_dict()
    assert set(state) == set(trained.state_dict())
    dist_checkpointing.save({"model": state, "iteration": 7, "rng": ShardedObject("rng", [1, 2])}, tmp_path)
    assert not torch.equal(fresh.decoder.layers[0].mlp.linear_fc1.weight, trained.decoder.layers[0].mlp.linear_fc1.weight)
    loaded = dist_checkpointing.load({"model": fresh.sharded_state_dict(), "iteration": None, "rng": ShardedObject("rng")}, tmp_path)
    assert loaded["iteration"] == 7 and loaded["rng"] == [1, 2]
    fresh.load_state_dict(loaded["model"])
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="sharded_offsets"):
        fresh.sharded_state_dict(sharded_offsets=((0, 0, 1),))
