#!/usr/bin/env bash
# Every GPU measurement docs/performance.md reports for the newer features, in one run, each
# step under its own time limit so a failure costs one row. Logs go to $LOG_DIR (default
# ./gpu-report-logs); the last lines of each step are printed as it ends.
#
#   bash benchmarks/gpu_report_rows.sh                 # everything (about 40 minutes on one H100)
#   bash benchmarks/gpu_report_rows.sh tests fp8       # only the named sections
#
# Sections: tests (the GPU-marked tests), fp8 (gpt-1.7b / llama-1.6b, tensorwise and delayed,
# FP8 against bf16 in the same run; the 300-step convergence check), bert (BERT-large), mamba
# (the SSD kernel and the ~1.3B models at 4k/16k/64k), generation (ours against Hugging Face),
# fsdp2 (FSDP2 next to the distributed optimizer; needs 8 GPUs), graphs (gpt2-124m, BERT-large and
# the MoE benchmark eager against --cuda-graph-impl full_iteration, FP8 gpt-1.7b graphed, and the
# graph equality tests).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
LOG_DIR=${LOG_DIR:-gpu-report-logs}
mkdir -p "$LOG_DIR"
SECTIONS=${*:-tests fp8 bert mamba generation fsdp2 graphs}
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")

step() {  # step NAME SECONDS COMMAND...: run it with a limit, log it, show its end
  local name=$1 limit=$2
  shift 2
  echo "===== $name"
  timeout "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
  echo "(exit $?)"
  tail -6 "$LOG_DIR/$name.log" | cut -c1-300
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
for section in $SECTIONS; do
  case $section in
    tests)
      step gpu-tests 900 python3 -m pytest -q -p no:cacheprovider -m gpu tests ;;
    fp8)
      step fp8-tensorwise 900 python3 benchmarks/pretrain_bench.py --configs gpt-1.7b,llama-1.6b --fp8 tensorwise --iters 10 --warmup 4
      step fp8-delayed 900 python3 benchmarks/pretrain_bench.py --configs gpt-1.7b,llama-1.6b --fp8 delayed --iters 10 --warmup 4
      step fp8-linear 300 python3 benchmarks/fp8_linear_bench.py --profile
      step fp8-convergence 1800 python3 benchmarks/fp8_convergence.py --recipe tensorwise ;;
    bert)
      step bert-attention-mask 300 python3 benchmarks/attention_mask_bench.py
      step bert-large 600 python3 benchmarks/pretrain_bench.py --configs bert-large --iters 10 --warmup 4 ;;
    mamba)
      step ssd-kernel 300 python3 benchmarks/mamba_bench.py --only kernel
      step mamba-models 2400 python3 benchmarks/mamba_bench.py --only models --iters 6 --warmup 2 --timeout 600 \
        --log-dir "$LOG_DIR/mamba" ;;
    generation)
      step generation 1800 python3 benchmarks/generation_bench.py --shape llama-1.6b --batch-sizes 1 8 32 128 --profile-decode ;;
    fsdp2)
      if [ "$NGPU" -ge 8 ]; then
        step dist-optimizer-8gpu 1200 python3 benchmarks/pretrain_bench.py --configs llama3-8b --nproc 8 --tp 2 --distributed-optimizer --overlap
        step fsdp2-8gpu 1200 python3 benchmarks/pretrain_bench.py --configs llama3-8b --nproc 8 --tp 2 --fsdp2
        step fsdp2-gpu-tests 900 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu_parallel -k fsdp2
      else
        echo "===== fsdp2: needs 8 GPUs, found $NGPU; skipped"
      fi ;;
    graphs)
      step graph-tests 600 python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_full_cuda_graph_gpu.py
      for cfg in gpt2-124m bert-large; do
        step "$cfg-eager" 300 python3 benchmarks/pretrain_bench.py --configs "$cfg" --iters 14 --warmup 7 --log-interval 1
        step "$cfg-graphed" 300 python3 benchmarks/pretrain_bench.py --configs "$cfg" --iters 14 --warmup 7 \
          --log-interval 1 "--extra=--cuda-graph-impl full_iteration"
      done
      step fp8-graphed 600 python3 benchmarks/pretrain_bench.py --configs gpt-1.7b --fp8 tensorwise --iters 10 --warmup 4 \
        "--extra=--cuda-graph-impl full_iteration"
      step moe-eager 300 python3 benchmarks/moe_bench.py --iters 12 --warmup 5
      step moe-graphed 300 python3 benchmarks/moe_bench.py --iters 12 --warmup 5 "--extra=--cuda-graph-impl full_iteration" ;;
    *) echo "unknown section $section (tests fp8 bert mamba generation fsdp2 graphs)"; exit 2 ;;
  esac
done
