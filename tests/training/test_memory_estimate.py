"""megatron/training/memory_estimate.py: each term by hand on a small shape, and how the
numbers move with TP, DP, the distributed optimizer, recompute and the pipeline schedule."""

from __future__ import annotations

import pytest

from megatron.training.arguments import parse_and_validate
from megatron.training.memory_estimate import (
    ChunkShape,
    RankParams,
    activation_memory,
    chunks_from_counts,
    estimate_memory,
    in_flight_microbatches,
    layer_activation_bytes,
    static_memory,
)

SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
         "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
         "--train-iters", "1", "--lr", "1e-3", "--hidden-dropout", "0", "--attention-dropout", "0", "--bf16"]


def _args(*extra, world=1, gbs=16):
    args = parse_and_validate(SHAPE + ["--global-batch-size", str(gbs)] + list(extra), world_size=world)
    args.padded_vocab_size = 512
    return args


def test_static_memory_bytes_per_parameter():
    """bf16 weights (2), fp32 grads (4), fp32 main param + Adam moments (12), the latter over
    DP x CP with the distributed optimizer."""
    args = _args(world=4)
    params = RankParams(dense=1000)
    assert static_memory(args, params, distributed_optimizer=False) == (2000.0, 4000.0, 12000.0)
    assert static_memory(args, params, distributed_optimizer=True) == (2000.0, 4000.0, 3000.0)
    fp32 = parse_and_validate(SHAPE[:-1] + ["--global-batch-size", "16"], world_size=1)
    assert static_memory(fp32, params, distributed_optimizer=False) == (4000.0, 4000.0, 8000.0)


def test_layer_activations_by_hand():
    """One layer, one micro-batch of 32 x 2 tokens, bf16, no TP: per token 2 bytes x
    (4h norms + 2h q/k/v... + h attention output + 2f MLP) = 2 x (256 + 192 + 64 + 512)."""
    args = _args()
    assert layer_activation_bytes(args) == 64 * 2 * (4 * 64 + 3 * 64 + 64 + 2 * 256)


def test_tensor_parallel_with_sequence_parallel_divides_activations():
    one = layer_activation_bytes(_args())
    two = layer_activation_bytes(_args("--tensor-model-parallel-size", "2", "--sequence-parallel", world=2))
    assert two == pytest.approx(one / 2)
    no_sp = layer_activation_bytes(_args("--tensor-model-parallel-size", "2", world=2))
    assert one / 2 < no_sp < one  # norms' tensors are not split without SP


def test_full_recompute_keeps_only_layer_inputs_plus_one_layer():
    args = _args("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1")
    chunks = [ChunkShape(4, pre_process=True, post_process=False)]
    none = activation_memory(args, chunks, 0, None)
    full = activation_memory(args, chunks, 0, "full")
    layer_input = 2 * 64 * 64  # bf16 [s, b, h]
    assert none == 4 * layer_activation_bytes(args)
    assert full == 4 * layer_input + layer_activation_bytes(args)
    assert activation_memory(args, chunks, 0, "selective") == none  # SDPA keeps nothing extra to drop


def test_distributed_optimizer_and_dp_scale_only_the_optimizer_state():
    params = RankParams(dense=10_000)
    chunks = [ChunkShape(4, True, True)]
    dp2 = estimate_memory(_args(world=2), params, chunks, 0, distributed_optimizer=True)
    dp4 = estimate_memory(_args(world=4), params, chunks, 0, distributed_optimizer=True)
    plain = estimate_memory(_args(world=4), params, chunks, 0, distributed_optimizer=False)
    assert dp4.optimizer == pytest.approx(dp2.optimizer / 2)
    assert plain.optimizer == pytest.approx(dp4.optimizer * 4)
    assert (dp2.weights, dp2.grads, dp2.activations) == (dp4.weights, dp4.grads, dp4.activations)


def test_pipeline_in_flight_micro_batches():
    """1F1B: stage r of pp holds pp - r micro-batches; interleaved adds the extra warm-up."""
    args = _args("--pipeline-model-parallel-size", "4", world=4, gbs=16)  # 8 micro-batches
    assert [in_flight_microbatches(args, r, 1) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight_microbatches(args, r, 2) for r in range(4)] == [11, 9, 7, 5]
    few = _args("--pipeline-model-parallel-size", "4", world=4, gbs=4)  # 2 micro-batches
    assert in_flight_microbatches(few, 0, 1) == 2
    assert in_flight_microbatches(_args(), 0, 1) == 1


def test_last_stage_adds_the_loss_head():
    args = _args()
    body = activation_memory(args, [ChunkShape(4, True, False)], 0, None)
    with_head = activation_memory(args, [ChunkShape(4, True, True)], 0, None)
    tokens = 64
    assert with_head - body == tokens * (2 * 2 * 64 + 4 * 512 + 2 * 512)


def test_chunks_from_counts_marks_first_and_last_virtual_stage():
    assert chunks_from_counts([2, 2], 0, 2) == [ChunkShape(2, True, False), ChunkShape(2, False, False)]
    assert chunks_from_counts([2, 2], 1, 2) == [ChunkShape(2, False, False), ChunkShape(2, False, True)]
