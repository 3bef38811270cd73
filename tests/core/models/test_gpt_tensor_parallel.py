"""GPTModel at TP=2 (with and without sequence parallelism) equals TP=1.

Both runs build the same full model: use_cpu_initialization draws every full weight
from the default CPU generator in the same order, then each rank keeps its shard.
Tolerance: TP changes only the order of fp32 sums (row-parallel partial products are
all-reduced, vocab-parallel softmax sums shards), so results differ by rounding
(~1e-7 relative); 1e-5 relative and 1e-6 absolute sit well above that. A gradient is a sum of
per-token terms of order 1 that largely cancel (a bias gradient of 0.1 from 32 tokens), so its
rounding is measured against the terms: gradients get 1e-5 absolute. A wrong shard, stride or
missing reduction is off by the size of the terms themselves.
"""

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

VOCAB, SEQ, BATCH, SEED = 128, 16, 2, 1234
TOL = dict(atol=1e-6, rtol=1e-5)
GRAD_TOL = dict(atol=1e-5, rtol=1e-5)

CASES = {
    "gpt": (
        dict(num_layers=2, hidden_size=64, num_attention_heads=4),
        dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True),
    ),
    "llama": (
        dict(
            num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
            normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            add_qkv_bias=True, qk_layernorm=True,
        ),
        dict(position_embedding_type="rope", share_embeddings_and_output_weights=False, rotary_base=10000),
    ),
    # attention sinks: the per-head softmax_offset is split over ranks like the heads
    "sinks": (
        dict(
            num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, normalization="RMSNorm",
            add_bias_linear=False, softmax_type="learnable", qk_l2_norm=True,
        ),
        dict(position_embedding_type="rope", share_embeddings_and_output_weights=False),
    ),
}


def _build(case: str, tp: int, sequence_parallel: bool) -> GPTModel:
    config_kwargs, model_kwargs = CASES[case]
    config = TransformerConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, **config_kwargs,
    )
    torch.manual_seed(SEED)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, parallel_output=False, **model_kwargs)


def _data():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen), torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def _run(model: GPTModel):
    """Logits (full vocab), per-token loss, and grads of loss.sum()."""
    ids, labels = _data()
    with torch.no_grad():
        logits = model(ids, None, None)
    loss = model(ids, None, None, labels=labels)
    loss.sum().backward()
    return logits, loss.detach()


def _full_grad(param: torch.Tensor, group) -> torch.Tensor:
    """This parameter's grad as one TP=1 process would have it.

    Shards are gathered along partition_dim (undoing a stride-s split, where rank r holds
    chunks r, r+tp, ... of the full dim); grads marked sequence_parallel are partial sums
    per rank and are summed, as the gradient-finalization step does.
    """
    grad = param.grad
    if getattr(param, "tensor_model_parallel", False):
        world = dist.get_world_size(group)
        shards = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(shards, grad.contiguous(), group=group)
        stride, dim = param.partition_stride, param.partition_dim
        pieces = [torch.chunk(shard, stride, dim=dim) for shard in shards]
        return torch.cat([pieces[r][s] for s in range(stride) for r in range(world)], dim=dim)
    if getattr(param, "sequence_parallel", False):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
    return grad


def _tp_rank_fn(rank, world_size):
    groups = parallel_state.initialize_model_parallel(world_size, 1)
    out = {}
    for case in CASES:
        for sp in (False, True):
            model = _build(case, world_size, sp)
            logits, loss = _run(model)
            grads = {name: _full_grad(p, groups.tp) for name, p in model.named_parameters()}
            out[(case, sp)] = dict(logits=logits, loss=loss, grads=grads)
    # Plain bytes: tensors sent through a multiprocessing queue live in shared memory that
    # disappears when this process exits.
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tp2_results():
    return [torch.load(io.BytesIO(blob)) for blob in run_on_ranks(_tp_rank_fn, 2)]


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1(tp2_results, case, sequence_parallel):
    reference = _build(case, 1, False)
    logits, loss = _run(reference)
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    for rank, results in enumerate(tp2_results):
        got = results[(case, sequence_parallel)]
        torch.testing.assert_close(got["logits"], logits, **TOL, msg=lambda m: f"rank {rank} logits: {m}")
        torch.testing.assert_close(got["loss"], loss, **TOL, msg=lambda m: f"rank {rank} loss: {m}")
        assert sorted(got["grads"]) == sorted(ref_grads)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, **GRAD_TOL, msg=lambda m: f"rank {rank} {name}: {m}")
