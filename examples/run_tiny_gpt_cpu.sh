#!/usr/bin/env bash
# A tiny GPT on mock data, tensor parallel 2 x data parallel 2, on 4 CPU processes (gloo).
# Installs the project (and the CPU build of torch) if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -c "import megatron.core" >/dev/null 2>&1 || "$PY" -m pip install --quiet -e .
NPROC=${NPROC:-4}
exec "$PY" -m torch.distributed.run --nproc-per-node "$NPROC" pretrain_gpt.py \
    --tensor-model-parallel-size 2 \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
    --seq-length 128 --max-position-embeddings 128 \
    --micro-batch-size 2 --global-batch-size 8 \
    --train-iters 20 --lr 1e-3 \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 512 \
    --log-interval 1 "$@"
