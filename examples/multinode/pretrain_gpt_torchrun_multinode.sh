#!/usr/bin/env bash
# Pretrain a GPT across several nodes with torchrun. Run this same script once on every node,
# changing only NODE_RANK:
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=6000 \
#              bash examples/multinode/pretrain_gpt_torchrun_multinode.sh
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example MASTER_PORT=6000 \
#              bash examples/multinode/pretrain_gpt_torchrun_multinode.sh
#
# Any arguments are appended to pretrain_gpt.py's flags; a flag given again wins, so
#   ... pretrain_gpt_torchrun_multinode.sh --train-iters 300 --tensor-model-parallel-size 2
# changes the length and layout without editing the script.
#
# Environment (defaults in brackets):
#   NNODES [1]            number of nodes
#   NODE_RANK [0]         this node's index, 0..NNODES-1 (node 0 hosts the rendezvous)
#   MASTER_ADDR [127.0.0.1]  address of node 0, reachable from every node
#   MASTER_PORT [6000]    a free TCP port on node 0
#   NPROC_PER_NODE [GPUs on this node, or 1 without a GPU]
#   DATA_PATH []          a --data-path prefix (.bin/.idx); empty trains on --mock-data
#   TOKENIZER_ARGS []     tokenizer flags for DATA_PATH, e.g.
#                         "--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt"
#   PRECISION [bf16]      bf16, fp16 or fp32
#   CHECKPOINT_DIR []     --save/--load directory (shared by all nodes); empty saves nothing
#   PYTHON [python3]
#
# Network knobs that clusters usually need, set in the environment before running (NCCL reads
# them directly; nothing here sets them):
#   NCCL_SOCKET_IFNAME=eth0        the interface NCCL's bootstrap and socket transport use,
#                                  when the default pick is a docker or loopback interface
#   NCCL_IB_HCA=mlx5_0,mlx5_1      which InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP
#   NCCL_DEBUG=INFO                prints the transports chosen, the first thing to look at
#   GLOO_SOCKET_IFNAME=eth0        the same choice for gloo (CPU runs, some CPU-side groups)
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
PRECISION=${PRECISION:-bf16}

# A GPT-2-small-sized model: big enough that the data-parallel all-reduce is real work,
# small enough to start in seconds.
MODEL_ARGS=(
    --num-layers 12 --hidden-size 768 --num-attention-heads 12
    --seq-length 1024 --max-position-embeddings 1024
)
TRAIN_ARGS=(
    --micro-batch-size 4 --global-batch-size $((4 * NNODES * NPROC_PER_NODE))
    --train-iters 1000 --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 100
    --weight-decay 0.1 --clip-grad 1.0
    --log-interval 10 --log-throughput --eval-interval 500 --eval-iters 10
)
case "$PRECISION" in
    bf16|fp16) TRAIN_ARGS+=("--$PRECISION") ;;
    fp32) ;;
    *) echo "PRECISION=$PRECISION: use bf16, fp16 or fp32" >&2; exit 2 ;;
esac

if [ -n "${DATA_PATH:-}" ]; then
    # shellcheck disable=SC2206  # TOKENIZER_ARGS is a list of flags, split on purpose
    DATA_ARGS=(--data-path "$DATA_PATH" --split 949,50,1 ${TOKENIZER_ARGS:-})
else
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 50257)
fi

CHECKPOINT_ARGS=()
if [ -n "${CHECKPOINT_DIR:-}" ]; then
    CHECKPOINT_ARGS=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 500)
fi

# Static rendezvous: node 0 listens on MASTER_ADDR:MASTER_PORT and every node names its rank.
exec "$PY" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    pretrain_gpt.py "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "$@"
