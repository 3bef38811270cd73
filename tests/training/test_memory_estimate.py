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
    (4h norms + 3h QKV output + h attention output + 2f MLP), plus fp32 1/rms of the two
    norms and the log-sum-exp of 4 heads (not kept by selective recompute)."""
    args = _args()
    assert layer_activation_bytes(args) == 64 * (2 * (4 * 64 + 3 * 64 + 64 + 2 * 256) + 4 * 2 + 4 * 4)
    assert layer_activation_bytes(args, selective=True) == layer_activation_bytes(args) - 64 * 4 * 4


def test_tensor_parallel_with_sequence_parallel_divides_activations():
    one = layer_activation_bytes(_args())
    two = layer_activation_bytes(_args("--tensor-model-parallel-size", "2", "--sequence-parallel", world=2))
    assert two == pytest.approx(one / 2, rel=1e-3)
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
    # with SDPA, selective recompute drops only the log-sum-exp
    assert activation_memory(args, chunks, 0, "selective") == 4 * layer_activation_bytes(args, selective=True)


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


def test_schedule_walk_agrees_with_the_closed_form():
    """Equal chunks: the peak found by walking each rank's schedule is the in-flight count
    times one chunk's activations; unequal chunks weigh each chunk by its own size."""
    from megatron.training.memory_estimate import peak_in_flight_bytes

    args = _args("--pipeline-model-parallel-size", "4", world=4, gbs=16)
    for chunks in (1, 2):
        for rank in range(4):
            assert peak_in_flight_bytes(args, rank, [10.0] * chunks) == 10.0 * in_flight_microbatches(args, rank, chunks)
    # last rank, interleaved: 4 warm-up forwards of chunk 0 (micro-batches 0-3), then chunk 1
    # of micro-batch 0 before the first backward
    assert peak_in_flight_bytes(args, 3, [10.0, 30.0]) == 4 * 10.0 + 30.0


def test_last_stage_adds_the_loss_head():
    args = _args()
    body = activation_memory(args, [ChunkShape(4, True, False)], 0, None)
    with_head = activation_memory(args, [ChunkShape(4, True, True)], 0, None)
    tokens = 64
    assert with_head - body == tokens * (2 * 2 * 64 + 4 * 512 + 2 * 512)


def test_chunks_from_counts_marks_first_and_last_virtual_stage():
    assert chunks_from_counts([2, 2], 0, 2) == [ChunkShape(2, True, False), ChunkShape(2, False, False)]
    assert chunks_from_counts([2, 2], 1, 2) == [ChunkShape(2, False, False), ChunkShape(2, False, True)]


def _saved_activation_bytes(extra):
    """Bytes of the tensors autograd keeps for backward in one forward of a real bf16 model
    (unique storages, parameters excluded), with the eager RMSNorm's two fp32 copies counted
    as the bf16 input the fused CUDA norm keeps instead; and the estimate for that model."""
    import torch

    import pretrain_gpt
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.global_vars import set_global_variables
    from megatron.training.memory_estimate import logits_transient_bytes

    argv = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "1", "--lr", "1e-3", "--hidden-dropout", "0", "--attention-dropout", "0", "--bf16",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--use-cpu-initialization",
            "--normalization", "RMSNorm", "--mock-data"] + extra
    args = parse_and_validate(argv, world_size=1)
    args.padded_vocab_size = 512
    set_global_variables(args)
    model_parallel_cuda_manual_seed(1)
    model = pretrain_gpt.model_provider(True, True).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            fp32_norm_copy = t.dtype == torch.float32 and t.dim() == 3 and t.shape[-1] == 128
            kept[storage.data_ptr()] = 0 if fp32_norm_copy else storage.nbytes()
        return t

    tokens = torch.randint(0, 512, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(64).expand(2, -1), None, labels=tokens)
    norm_inputs = 5 * 2 * 128 * 128  # 2 norms x 2 layers + final norm, bf16 [s, b, h]
    estimate = activation_memory(args, [ChunkShape(2, True, True)], 0, None) - logits_transient_bytes(args)
    return sum(kept.values()) + norm_inputs, estimate


@pytest.mark.parametrize("extra", [
    [],
    ["--swiglu", "--position-embedding-type", "rope", "--group-query-attention", "--num-query-groups", "2",
     "--disable-bias-linear"],
])
def test_activation_formula_matches_what_autograd_keeps(extra):
    """Within 3 %: one [s, b, h] tensor per layer too many or too few (64 KiB of ~1.5 MiB)
    would fail it; what is left over is the rotary cos/sin tables and the labels."""
    saved, estimate = _saved_activation_bytes(extra)
    assert saved == pytest.approx(estimate, rel=0.03)


MAMBA = ["--mamba-state-dim", "16", "--mamba-head-dim", "16", "--mamba-num-groups", "2"]


def test_mamba_layer_activations_by_hand():
    """A Mamba layer per token (inner width 2h = 128, 8 heads, 2 groups of state 16): the
    norm's input and output and fp32 1/rms, the in-projection output z|xBC|dt (2 di + 2GN
    + H), the conv's contiguous input and its output (di + 2GN each), y and the gated
    norm's output (di each), all bf16; dt before and after softplus and the gated norm's
    1/rms per group in fp32."""
    args = _args(*MAMBA)
    di, heads, bc = 128, 8, 2 * 2 * 16
    per_token = 2 * 2 * 64 + 4 + 2 * ((2 * di + bc + heads) + 2 * (di + bc) + 2 * di) + 4 * (2 * heads + 2)
    assert layer_activation_bytes(args, kind="M") == 64 * per_token
    # the hybrid attention and MLP layers are the two halves of a transformer layer
    halves = layer_activation_bytes(args, kind="*") + layer_activation_bytes(args, kind="-")
    assert halves == layer_activation_bytes(args)
    with pytest.raises(ValueError, match="unknown layer kind"):
        layer_activation_bytes(args, kind="x")


def test_hybrid_chunk_counts_each_layer_kind_and_recomputes_in_uniform_groups():
    args = _args(*MAMBA)
    chunk = ChunkShape(4, pre_process=True, post_process=False, hybrid_pattern="M*-M")
    kinds = [layer_activation_bytes(args, kind=k) for k in "M*-M"]
    assert activation_memory(args, [chunk], 0, None) == sum(kinds)
    layer_input = 2 * 64 * 64
    for method in ("uniform", "block"):  # the hybrid stack reads both as uniform groups
        full = _args(*MAMBA, "--recompute-granularity", "full", "--recompute-method", method,
                     "--recompute-num-layers", "2")
        # two groups of two layers: their inputs, plus the larger group rebuilt in backward
        assert activation_memory(full, [chunk], 0, "full") == 2 * layer_input + max(kinds[0] + kinds[1],
                                                                                   kinds[2] + kinds[3])


def test_chunk_shapes_read_the_hybrid_pattern_of_a_built_model():
    from megatron.core.models.mamba.hybrid_stack import HybridStack
    from megatron.core.ssm.mamba_config import MambaConfig
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.model_census import chunk_shapes, on_meta_device

    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                               use_cpu_initialization=True)
    with on_meta_device():
        stack = HybridStack(config, MambaConfig(mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2), "M*-M")
    (shape,) = chunk_shapes([stack])
    assert (shape.num_layers, shape.hybrid_pattern, shape.layer_kinds()) == (4, "M*-M", "M*-M")
    assert ChunkShape(3, True, True).layer_kinds() == "TTT"
