#!/usr/bin/env bash
# Preprocess a slice of the King James Bible (public domain, shipped in shared/assets) with
# the GPT-2 tokenizer, then train a tiny GPT on it on CPU (gloo), data parallel over NPROC
# processes. Takes a few minutes; the loss falls from ~10.9. Installs the project (and the
# CPU build of torch) if they are missing.
#
#   bash examples/run_tiny_gpt_cpu.sh [extra pretrain_gpt.py flags]
#
# Environment: NPROC (2), DOCS (documents of the corpus to use, 400), ITERS (80),
# WORK (a directory for the dataset and its index cache; a fresh temporary one by default).
# Without the shared corpus it falls back to --mock-data and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -c "import megatron.core" >/dev/null 2>&1 || "$PY" -m pip install --quiet -e .

NPROC=${NPROC:-2}
DOCS=${DOCS:-400}
ITERS=${ITERS:-80}

# shared/assets lives beside (or above) the checkout: walk up until it is found.
ASSETS=""
dir=$(pwd)
while [ "$dir" != "/" ]; do
    if [ -f "$dir/shared/assets/corpora/kjv.jsonl" ]; then ASSETS="$dir/shared/assets"; break; fi
    if [ -f "$dir/../shared/assets/corpora/kjv.jsonl" ]; then ASSETS="$(cd "$dir/../shared/assets" && pwd)"; break; fi
    dir=$(dirname "$dir")
done

MODEL=(
    --num-layers 2 --hidden-size 128 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128
    --micro-batch-size 4 --global-batch-size 16
    --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10
    --weight-decay 0.01 --clip-grad 1.0
    --eval-interval 40 --eval-iters 2
    --log-interval 10 --num-workers 0 --distributed-backend gloo
)

if [ -z "$ASSETS" ]; then
    echo "run_tiny_gpt_cpu.sh: shared/assets/corpora/kjv.jsonl not found above $(pwd);" \
         "training on --mock-data instead" >&2
    DATA=(--mock-data --tokenizer-type NullTokenizer --vocab-size 512)
else
    WORK=${WORK:-$(mktemp -d -t tiny-gpt-XXXXXX)}
    mkdir -p "$WORK"
    TOK=(--tokenizer-type GPT2BPETokenizer
         --vocab-file "$ASSETS/tokenizers/gpt2/vocab.json" --merge-file "$ASSETS/tokenizers/gpt2/merges.txt")
    if [ ! -f "$WORK/kjv_text_document.idx" ]; then
        head -n "$DOCS" "$ASSETS/corpora/kjv.jsonl" > "$WORK/kjv.jsonl"
        "$PY" tools/preprocess_data.py --input "$WORK/kjv.jsonl" --output-prefix "$WORK/kjv" \
            "${TOK[@]}" --append-eod --workers "$NPROC"
    fi
    echo "dataset: $WORK/kjv_text_document.{bin,idx}"
    DATA=(--data-path "$WORK/kjv_text_document" --split 98,2,0 --data-cache-path "$WORK/cache" "${TOK[@]}")
fi

exec "$PY" -m torch.distributed.run --nproc-per-node "$NPROC" pretrain_gpt.py "${MODEL[@]}" "${DATA[@]}" "$@"
