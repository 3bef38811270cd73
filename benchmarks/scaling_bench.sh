#!/usr/bin/env bash
# Multi-GPU scaling runs of benchmarks/pretrain_bench.py on the GPUs of one host, NVLink
# multicast off. Sections (any subset, in order): dp tp 8b
#   dp  gpt-1.7b, seq 4096: one GPU vs data parallel over all GPUs with the distributed
#       optimizer and overlapped reduce-scatter / all-gather (weak scaling: 16 micro-batches
#       of 2 per GPU per step)
#   tp  llama-1.6b, seq 4096, no recompute: one GPU vs TP = each of TP_SIZES (default: all
#       GPUs) with sequence parallelism, plain and with --tp-comm-overlap and
#       CUDA_DEVICE_MAX_CONNECTIONS=1; a TP group smaller than the GPUs runs on that many
#   8b  Llama-3-8B shape, seq 8192, micro-batch 1, GBS_8B (16) sequences per step, over all
#       GPUs: the layouts LAYOUTS_8B names (default: all of dp dp-block8 dp-full tp2 tp2-overlap
#       tpall pp2)
# Usage: bash benchmarks/scaling_bench.sh dp tp      (ITERS / WARMUP override the run length,
#        RUN_TIMEOUT stops one run after that many seconds, keeping what it measured)
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
      ${RUN_TIMEOUT:+--timeout "$RUN_TIMEOUT"} --json "$OUTDIR/$name.json" --log-dir "$OUTDIR/logs_$name" "$@" > "$OUTDIR/$name.txt" 2>&1; then
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
      for tp in ${TP_SIZES:-$NGPU}; do
        bench llama16b-tp$tp --configs llama-1.6b --nproc "$tp" --tp "$tp" --recompute none
        CUDA_DEVICE_MAX_CONNECTIONS=1 bench llama16b-tp$tp-commoverlap-1conn --configs llama-1.6b \
          --nproc "$tp" --tp "$tp" --recompute none --extra="--tp-comm-overlap"
      done
      ;;
    8b)
      # Model state alone is ~16 bytes/parameter before sharding: the layouts shard it with the
      # distributed optimizer (DP), tensor or pipeline parallelism; expandable segments keep
      # the allocator from fragmenting the last few GB.
      alloc_conf=${PYTORCH_CUDA_ALLOC_CONF-}
      export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
      B8=(--configs llama3-8b --nproc "$NGPU" --gbs "${GBS_8B:-16}" --mbs 1)
      DISTOPT=(--distributed-optimizer --overlap)
      BLOCK8="--recompute-granularity full --recompute-method block --recompute-num-layers 8"
      for layout in ${LAYOUTS_8B:-dp dp-block8 dp-full tp2 tp2-overlap tpall pp2}; do
        case $layout in
          dp) bench llama3-8b-dp$NGPU-distopt "${B8[@]}" "${DISTOPT[@]}" --recompute none ;;
          dp-block8) bench llama3-8b-dp$NGPU-distopt-block8 "${B8[@]}" "${DISTOPT[@]}" --recompute none \
                --extra="$BLOCK8" ;;
          dp-full) bench llama3-8b-dp$NGPU-distopt-full "${B8[@]}" "${DISTOPT[@]}" --recompute full ;;
          tp2) bench llama3-8b-tp2dp$((NGPU / 2))-distopt "${B8[@]}" --tp 2 "${DISTOPT[@]}" --recompute none ;;
          tp2-overlap) CUDA_DEVICE_MAX_CONNECTIONS=1 bench llama3-8b-tp2dp$((NGPU / 2))-distopt-commoverlap \
                "${B8[@]}" --tp 2 "${DISTOPT[@]}" --recompute none --extra="--tp-comm-overlap" ;;
          tpall) bench llama3-8b-tp$NGPU "${B8[@]}" --tp "$NGPU" --recompute none ;;
          pp2) bench llama3-8b-pp2dp$((NGPU / 2))-distopt "${B8[@]}" --pp 2 "${DISTOPT[@]}" --recompute none ;;
          *) echo "unknown LAYOUTS_8B entry $layout (dp dp-block8 dp-full tp2 tp2-overlap tpall pp2)"; status=1 ;;
        esac
      done
      PYTORCH_CUDA_ALLOC_CONF=$alloc_conf
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
              f"{fmt('tflops_per_gpu', '7.1f')} {fmt('mfu', '5.1f', 100.0)}% {fmt('max_allocated_gb', '6.1f')}"
              + (f"  ({r['skipped_iters']} measured iterations skipped the optimizer step)" if r.get("skipped_iters") else ""))
EOF
exit $status
