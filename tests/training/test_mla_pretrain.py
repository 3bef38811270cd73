"""pretrain_gpt.py with --multi-latent-attention and DeepSeek's router (sigmoid scores,
expert bias, group-limited top-k, shared expert) trains end to end, and TP=2 with sequence
parallelism, or CP=2, logs the losses of one process (gloo): the flags reach the model, the
replicated down projections' partial gradients are summed by the training loop's gradient
finalization, and context parallelism rotates each chunk by its global positions."""

import pytest

from tests.training.gpt_runs import losses, run_gpt

MLA_FLAGS = (
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear "
    "--qk-layernorm --multi-latent-attention --q-lora-rank 24 --kv-lora-rank 16 --qk-head-dim 16 "
    "--qk-pos-emb-head-dim 8 --v-head-dim 16 --num-experts 4 --moe-ffn-hidden-size 32 --moe-router-topk 2 "
    "--moe-layer-freq [0,1] --moe-shared-expert-intermediate-size 32 --moe-router-score-function sigmoid "
    "--moe-router-enable-expert-bias --moe-router-num-groups 2 --moe-router-group-topk 1 "
    "--moe-router-topk-scaling-factor 2.5 --moe-aux-loss-coeff 0"
).split()


@pytest.fixture(scope="module")
def single_process_losses():
    result = losses(run_gpt(1, MLA_FLAGS, iters=3))
    assert len(result) == 3 and result[-1] < result[0]
    return result


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--context-parallel-size", "2"],
])
def test_parallel_losses_match_one_process(single_process_losses, layout):
    parallel = losses(run_gpt(2, MLA_FLAGS + layout, iters=3))
    assert len(parallel) == 3
    for a, b in zip(single_process_losses, parallel):
        assert abs(a - b) <= 1e-4 * abs(a), (single_process_losses, parallel)
