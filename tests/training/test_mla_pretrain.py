"""pretrain_gpt.py with --multi-latent-attention and DeepSeek's router (sigmoid scores,
expert bias, group-limited top-k, shared expert) trains end to end, and TP=2 with sequence
parallelism (gloo) logs the losses of one process: the flags reach the model, and the
replicated down projections' partial gradients are summed by the training loop's gradient
finalization before the optimizer steps."""

from tests.training.gpt_runs import losses, run_gpt

MLA_FLAGS = (
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear "
    "--qk-layernorm --multi-latent-attention --q-lora-rank 24 --kv-lora-rank 16 --qk-head-dim 16 "
    "--qk-pos-emb-head-dim 8 --v-head-dim 16 --num-experts 4 --moe-ffn-hidden-size 32 --moe-router-topk 2 "
    "--moe-layer-freq [0,1] --moe-shared-expert-intermediate-size 32 --moe-router-score-function sigmoid "
    "--moe-router-enable-expert-bias --moe-router-num-groups 2 --moe-router-group-topk 1 "
    "--moe-router-topk-scaling-factor 2.5 --moe-aux-loss-coeff 0"
).split()


def test_tp2_sequence_parallel_losses_match_one_process():
    single = losses(run_gpt(1, MLA_FLAGS, iters=4))
    tp2 = losses(run_gpt(2, MLA_FLAGS + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], iters=4))
    assert len(single) == 4 and single[-1] < single[0]
    for a, b in zip(single, tp2):
        assert abs(a - b) <= 1e-4 * abs(a), (single, tp2)
