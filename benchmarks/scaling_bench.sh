#!/usr/bin/env bash
# Multi-GPU scaling runs of benchmarks/pretrain_bench.py on the GPUs of one host, NVLink
# multicast off. Sections (any subset, in order): dp tp 8b
#   dp  gpt-1.7b, seq 4096: one GPU vs data parallel over all GPUs with the distributed
#       optimizer and overlapped reduce-scatter / all-gather (weak scaling: 16 micro-batches
#       of 2 per GPU per step)
#   tp  llama-1.6b, seq 4096: one GPU vs TP=NGPU with sequence parallelism, without and with
#       --tp-comm-overlap, and with CUDA_DEVICE_MAX_CONNECTIONS=1
#   8b  Llama-3-8B shape, seq 8192, over all GPUs: the layouts that fit
# Usage: bash benchmarks/scaling_bench.sh dp tp      (ITERS / WARMUP override the run length)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
ITERS=${ITERS:-12}
WARMUP=${WARMUP:-5}
OUTDIR=${OUTDIR:-/tmp/scaling_bench}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpus', torch.cuda.device_count())"
status=0
bench() {  # bench NAME pretrain_bench-args...
  local name=$1; shift
  echo "== $name"
  if ! python3 benchmarks/pretrain_bench.py --quiet --iters "$ITERS" --warmup "$WARMUP" --log-interval 1 \
      --json "$OUTDIR/$name.json" --log-dir "$OUTDIR/logs_$name" "$@" > "$OUTDIR/$name.txt" 2>&1; then
    status=1
    tail -n 4 "$OUTDIR"/logs_"$name"/* 2>/dev/null | cut -c1-300
  fi
  grep -E "^\|" "$OUTDIR/$name.txt" | tail -1
  grep -iE "error|Traceback" "$OUTDIR/$name.txt" | head -3
}
for section in "$@"; do
  case $section in
    dp)
      bench gpt17b-1gpu --configs gpt-1.7b --nproc 1
      bench gpt17b-dp$NGPU --configs gpt-1.7b --nproc "$NGPU" --gbs $((32 * NGPU)) --distributed-optimizer --overlap
      ;;
    tp)
      bench llama16b-1gpu --configs llama-1.6b --nproc 1 --recompute none
      bench llama16b-tp$NGPU --configs llama-1.6b --nproc "$NGPU" --tp "$NGPU" --recompute none
      bench llama16b-tp$NGPU-commoverlap --configs llama-1.6b --nproc "$NGPU" --tp "$NGPU" --recompute none \
        --extra="--tp-comm-overlap"
      CUDA_DEVICE_MAX_CONNECTIONS=1 bench llama16b-tp$NGPU-commoverlap-1conn --configs llama-1.6b \
        --nproc "$NGPU" --tp "$NGPU" --recompute none --extra="--tp-comm-overlap"
      ;;
    8b)
      bench llama3-8b-tp$NGPU-selective --configs llama3-8b --nproc "$NGPU" --tp "$NGPU" --gbs 16 \
        --recompute selective --extra="--tp-comm-overlap"
      bench llama3-8b-dp$NGPU-distopt-full --configs llama3-8b --nproc "$NGPU" --gbs 16 \
        --distributed-optimizer --overlap --recompute full
      ;;
    *) echo "unknown section $section (dp, tp, 8b)"; exit 2 ;;
  esac
done
echo "== summary (ms/iter, tokens/s/GPU, TFLOP/s/GPU, MFU, max alloc GB)"
python3 - "$OUTDIR" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    data = json.loads(path.read_text())
    for r in data.get("rows", []):
        if r["status"] != "ok":
            print(f"{path.stem:44s} {r['status']}")
            continue
        fmt = lambda key, spec, scale=1.0: "-" if r[key] is None else format(scale * r[key], spec)
        print(f"{path.stem:44s} {fmt('ms_per_iter', '9.1f')} {fmt('tokens_per_s_per_gpu', '9.0f')} "
              f"{fmt('tflops_per_gpu', '7.1f')} {fmt('mfu', '5.1f', 100.0)}% {fmt('max_allocated_gb', '6.1f')}")
EOF
exit $status
