#!/usr/bin/env bash
# Train a tiny GPT on real text on CPU: the first five books of the King James Bible (public
# domain) with the GPT-2 tokenizer, both shipped in examples/data. Preprocesses the text with
# tools/preprocess_data.py, trains data parallel over NPROC processes (torchrun, gloo), saves
# checkpoints and TensorBoard logs, and prints where everything went. A few minutes on a laptop;
# the loss falls from ~10.9 to ~6.
#
#   bash examples/run_tiny_gpt_cpu.sh [extra pretrain_gpt.py flags, which win over the ones below]
#
# Needs only Python and pip: installs torch when there is none (TORCH_SPEC, default
# torch==2.13.0; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU-only build
# on Linux, or install the torch for your CUDA yourself first: an existing torch is never
# replaced), then this project (pip install -e) when it is not installed.
#
# Environment: PYTHON (python3), NPROC (2), ITERS (80), DOCS (chapters of the corpus to use,
# all 187 by default), RUN_DIR (runs/tiny-gpt-cpu in this checkout): the dataset, checkpoints,
# TensorBoard logs and the training log go there; run again with the same RUN_DIR to resume.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
NPROC=${NPROC:-2}
ITERS=${ITERS:-80}
DOCS=${DOCS:-187}
RUN_DIR=${RUN_DIR:-$ROOT/runs/tiny-gpt-cpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DATA=$ROOT/examples/data

# Probes run outside the checkout: from its root, the working tree would shadow what is installed.
has_module() { (cd / && "$PY" -c "import $1" >/dev/null 2>&1); }

if ! has_module torch; then
    echo "run_tiny_gpt_cpu.sh: torch is missing; installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    "$PY" -m pip install --quiet "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
if ! "$PY" "$ROOT/examples/check_install.py" "$ROOT"; then
    echo "run_tiny_gpt_cpu.sh: installing this project: $PY -m pip install -e $ROOT"
    "$PY" -m pip install --quiet -e "$ROOT"
    "$PY" "$ROOT/examples/check_install.py" "$ROOT"
fi

mkdir -p "$RUN_DIR/data"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
PREFIX=$RUN_DIR/data/kjv$DOCS
TOK=(--tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/gpt2/vocab.json" --merge-file "$DATA/gpt2/merges.txt")
if [ ! -f "${PREFIX}_text_document.idx" ]; then
    head -n "$DOCS" "$DATA/kjv_pentateuch.jsonl" > "$PREFIX.jsonl"
    "$PY" "$ROOT/tools/preprocess_data.py" --input "$PREFIX.jsonl" --output-prefix "$PREFIX" \
        "${TOK[@]}" --append-eod --workers "$NPROC"
fi

LOGS=()
if has_module tensorboard; then
    LOGS=(--tensorboard-dir "$RUN_DIR/tensorboard" --log-validation-ppl-to-tensorboard)
else
    echo "run_tiny_gpt_cpu.sh: tensorboard is not installed, so no TensorBoard logs" \
         "(pip install tensorboard to get them)"
fi

# ${LOGS[@]+...} below: an empty array under set -u is an error in bash 3.2 (macOS's).
ARGS=(
    --num-layers 2 --hidden-size 128 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128
    --micro-batch-size 4 --global-batch-size 16
    --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10
    --weight-decay 0.01 --clip-grad 1.0
    --eval-interval 40 --eval-iters 2
    --log-interval 10 --num-workers 0 --distributed-backend gloo
    --data-path "${PREFIX}_text_document" --split 98,2,0 --data-cache-path "$RUN_DIR/cache" "${TOK[@]}"
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 40
    ${LOGS[@]+"${LOGS[@]}"}
)

LOG=$RUN_DIR/train.log
"$PY" -m torch.distributed.run --nproc-per-node "$NPROC" "$ROOT/pretrain_gpt.py" "${ARGS[@]}" "$@" 2>&1 | tee "$LOG"

cat <<EOF

Done. Everything is under $RUN_DIR:
  dataset      $RUN_DIR/data/ (kjv${DOCS}_text_document.bin/.idx; index cache in cache/)
  checkpoints  $RUN_DIR/checkpoints/ (latest iteration in latest_checkpointed_iteration.txt)
  training log $LOG
EOF
if [ ${#LOGS[@]} -gt 0 ]; then
    echo "  TensorBoard  $RUN_DIR/tensorboard/   view: tensorboard --logdir $RUN_DIR/tensorboard"
fi
cat <<EOF
Resume: run the same command again (same RUN_DIR); it continues from the latest checkpoint.
Train longer: ITERS=160 RUN_DIR=$RUN_DIR bash $0 --override-opt-param-scheduler
  (the learning-rate schedule then follows the new --train-iters instead of the saved one).
Start over: rm -r $RUN_DIR
EOF
