#!/usr/bin/env bash
# GPU smoke run: versions, the GPU-marked tests, the tiny GPT over NCCL (bf16, TP=2 when two
# GPUs are present), and one timed GPT-350M-shaped run with --log-throughput.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -3
TINY="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128
 --micro-batch-size 2 --global-batch-size 8 --train-iters 20 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer
 --vocab-size 512 --log-interval 5 --eval-iters 2"
TP=$(( NGPU >= 2 ? 2 : 1 ))
for prec in --bf16 --fp16; do
  echo "== tiny GPT, $NGPU GPU(s), TP=$TP, $prec"
  torchrun --nproc-per-node "$NGPU" pretrain_gpt.py $TINY --tensor-model-parallel-size $TP $prec 2>&1 \
    | grep -E "iteration +(1|20)/|validation loss at iteration 20 on|Error" | cut -c1-260
done
echo "== gpt-350m shape, 1 GPU, bf16, seq 2048"
torchrun --nproc-per-node 1 pretrain_gpt.py --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \
  --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 8 --global-batch-size 64 \
  --train-iters 30 --lr 3e-4 --bf16 --mock-data --tokenizer-type NullTokenizer --vocab-size 50257 \
  --log-interval 10 --log-throughput --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 2>&1 \
  | grep -E "iteration +(10|20|30)/|memory|Error|error" | cut -c1-300
