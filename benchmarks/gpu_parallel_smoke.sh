#!/usr/bin/env bash
# Multi-GPU smoke run over NCCL: the GPU-marked tests, then a tiny GPT (bf16, 4 layers) with
# each parallel layout on the GPUs present, and the one-GPU MoE benchmark.
# Prints the first and last log lines of each run; exits non-zero if a run fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests -rf 2>&1 | tail -6
TINY="--num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 --max-position-embeddings 256
 --micro-batch-size 2 --global-batch-size 16 --train-iters 30 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer
 --vocab-size 1024 --log-interval 10 --eval-iters 2 --bf16 --position-embedding-type rope --swiglu
 --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights"
status=0
run() {
  local name=$1; shift
  echo "== $name"
  if ! torchrun --nproc-per-node "$NGPU" pretrain_gpt.py $TINY "$@" > "/tmp/$name.log" 2>&1; then
    status=1; tail -20 "/tmp/$name.log"
  fi
  grep -E "iteration +(1|30)/" "/tmp/$name.log" | sed -E 's/.*(iteration +[0-9]+).*(elapsed[^|]*).*(lm loss: [^|]*).*(grad norm: [^|]*).*/\1 | \2 | \3 | \4/'
}
if [ "$NGPU" -ge 2 ]; then
  run pp2 --pipeline-model-parallel-size 2
  run pp2-vpp2 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1
  run dp2-distopt-overlap --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  run tp2-sp --tensor-model-parallel-size 2 --sequence-parallel
  run ep2-moe --num-experts 4 --moe-router-topk 2 --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall
fi
if [ "$NGPU" -ge 2 ]; then
  echo "== context parallel: 32k-token sequences, CP=$NGPU (a2a), 8 layers h2048, bf16"
  torchrun --nproc-per-node "$NGPU" pretrain_gpt.py --num-layers 8 --hidden-size 2048 --num-attention-heads 16 \
    --group-query-attention --num-query-groups 4 --ffn-hidden-size 5632 --swiglu --normalization RMSNorm \
    --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights \
    --seq-length 32768 --max-position-embeddings 32768 --micro-batch-size 1 --global-batch-size 2 \
    --context-parallel-size "$NGPU" --cp-comm-type a2a --train-iters 12 --lr 1e-4 --bf16 \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --log-interval 4 --log-throughput \
    --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 > /tmp/cp.log 2>&1 || { status=1; tail -20 /tmp/cp.log; }
  grep -E "iteration +(4|8|12)/|memory" /tmp/cp.log | cut -c1-260
fi
echo "== moe benchmark (1 GPU)"
python3 benchmarks/moe_bench.py --iters 12 2>&1 | tail -8
exit $status
