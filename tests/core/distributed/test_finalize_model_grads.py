"""finalize_model_grads on 2 ranks: sequence-parallel grads summed over tp, tied
embedding grads summed between first and last stage, per-token-loss division.

One 2-rank launch walks three layouts (tp=2, pp=2, dp=2). Values are small integers
times a fixed tensor, so every sum is exact in fp32 and the comparison is exact.
"""

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

BASE = torch.arange(1.0, 5.0)


def _chunk(rank, calculate_per_token_loss=False, marker=None):
    module = torch.nn.ParameterDict({"marked": torch.nn.Parameter(torch.zeros(4)), "plain": torch.nn.Parameter(torch.zeros(4))})
    if marker:
        setattr(module["marked"], marker, True)
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, calculate_per_token_loss=calculate_per_token_loss)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), module)
    for p in module.parameters():
        p.main_grad.copy_((rank + 1) * BASE)
    return ddp


def _grads(ddp):
    return {name: p.main_grad.clone() for name, p in ddp.module.items()}


def _layouts(rank, world_size):
    out = {}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    chunk = _chunk(rank, marker="sequence_parallel")
    finalize_model_grads([chunk])
    out["tp"] = _grads(chunk)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    chunk = _chunk(rank, calculate_per_token_loss=True, marker="shared_embedding")
    # Only the last stage computes the loss, so only its count is meaningful.
    num_tokens = torch.tensor(4 if rank == 1 else 0)
    finalize_model_grads([chunk], num_tokens=num_tokens)
    out["pp"] = _grads(chunk)
    out["pp_tokens"] = int(num_tokens)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel()
    chunk = _chunk(rank, calculate_per_token_loss=True)
    num_tokens = torch.tensor([3, 5][rank])
    finalize_model_grads([chunk], num_tokens=num_tokens)
    out["dp"] = _grads(chunk)
    out["dp_tokens"] = int(num_tokens)
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_layouts, 2)


def test_sequence_parallel_grads_summed_over_tp(results):
    for rank, res in enumerate(results):
        assert torch.equal(res["tp"]["marked"], 3 * BASE)
        assert torch.equal(res["tp"]["plain"], (rank + 1) * BASE)


def test_shared_embedding_grads_summed_between_stages(results):
    for rank, res in enumerate(results):
        assert res["pp_tokens"] == 4
        assert torch.equal(res["pp"]["marked"], 3 * BASE / 4)
        assert torch.equal(res["pp"]["plain"], (rank + 1) * BASE / 4)


def test_per_token_loss_divides_by_global_token_count(results):
    for res in results:
        assert res["dp_tokens"] == 8
        # summed (not averaged) over dp, then divided by 3 + 5 tokens
        assert torch.equal(res["dp"]["marked"], 3 * BASE / 8)
        assert torch.equal(res["dp"]["plain"], 3 * BASE / 8)
