"""Training throughput of a Mixtral-shaped small MoE model on one GPU (bf16).

Usage: python benchmarks/moe_bench.py [--num-layers 8] [--hidden-size 2048] [--num-experts 8]
           [--topk 2] [--moe-ffn-hidden-size 5632] [--seq-length 4096] [--micro-batch-size 1]
           [--global-batch-size 8] [--iters 20] [--no-grouped-gemm] [--dispatcher alltoall]
           [--shared-expert-size 0] [--extra "raw pretrain_gpt.py flags"]

Runs ``pretrain_gpt.py`` under torchrun (mock data, --log-throughput) with RMSNorm, SwiGLU,
RoPE, GQA (4 query groups), untied embeddings, no biases, load-balancing aux loss 1e-2,
and parses its log: milliseconds per iteration and TFLOP/s per GPU (Megatron's formula,
MoE layers counted as top-k experts of --moe-ffn-hidden-size; megatron-facts 7.3),
averaged over the logged iterations after the first ``--warmup`` ones. Prints tokens/s,
TFLOP/s, MFU against 989.4 TFLOP/s (H100/H200 dense bf16), and the device, torch, CUDA
and cuDNN versions.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.4
ITERATION = re.compile(r"iteration +(\d+)/.*?elapsed time per iteration \(ms\): ([0-9.]+) \| "
                       r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)")


def _flags(a) -> list:
    flags = [
        "--num-layers", a.num_layers, "--hidden-size", a.hidden_size, "--num-attention-heads", a.heads,
        "--group-query-attention", "--num-query-groups", 4, "--ffn-hidden-size", a.moe_ffn_hidden_size,
        "--num-experts", a.num_experts, "--moe-router-topk", a.topk, "--moe-ffn-hidden-size", a.moe_ffn_hidden_size,
        "--moe-token-dispatcher-type", a.dispatcher, "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "1e-2", "--seq-length", a.seq_length, "--max-position-embeddings", a.seq_length,
        "--micro-batch-size", a.micro_batch_size, "--global-batch-size", a.global_batch_size,
        "--train-iters", a.iters, "--lr", "3e-4", "--bf16", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", a.vocab_size, "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--log-interval", 1, "--log-throughput",
        "--eval-iters", 0, "--hidden-dropout", 0, "--attention-dropout", 0,
    ]
    if a.grouped_gemm:
        flags.append("--moe-grouped-gemm")
    if a.shared_expert_size:
        flags += ["--moe-shared-expert-intermediate-size", a.shared_expert_size]
    return [str(f) for f in flags]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=5632)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dispatcher", default="alltoall", choices=["alltoall", "allgather"])
    p.add_argument("--no-grouped-gemm", dest="grouped_gemm", action="store_false")
    p.add_argument("--shared-expert-size", type=int, default=0,
                   help="--moe-shared-expert-intermediate-size (0: no shared expert); DeepSeek-style fine-grained "
                        "experts: --num-experts 64 --topk 6 --moe-ffn-hidden-size 1408 --shared-expert-size 2816")
    p.add_argument("--extra", default="", help='raw pretrain_gpt.py flags appended last, e.g. --extra="--profile '
                   '--use-pytorch-profiler --profile-step-start 6 --profile-step-end 7" (its breakdown is printed)')
    a = p.parse_args()

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(ROOT / "pretrain_gpt.py")]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.run(cmd + _flags(a) + shlex.split(a.extra), cwd=ROOT, env=env, capture_output=True, text=True)
    rows = [(int(i), float(ms), float(tf)) for i, ms, tf in ITERATION.findall(run.stdout)]
    timed = [r for r in rows if r[0] > a.warmup]
    if run.returncode != 0 or not timed:
        sys.stdout.write(run.stdout[-3000:] + run.stderr[-3000:])
        raise SystemExit(f"pretrain_gpt.py failed (exit {run.returncode}) or logged no timed iterations")
    ms = sum(r[1] for r in timed) / len(timed)
    tflops = sum(r[2] for r in timed) / len(timed)
    tokens_per_s = a.global_batch_size * a.seq_length / (ms / 1000.0)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device: {device} | torch {torch.__version__} | cuda {torch.version.cuda} | "
          f"cudnn {torch.backends.cudnn.version()}")
    print(f"model: {a.num_layers} layers, hidden {a.hidden_size}, {a.num_experts} experts top-{a.topk}, "
          f"expert ffn {a.moe_ffn_hidden_size}, shared expert {a.shared_expert_size or 'none'}, seq {a.seq_length}, global batch {a.global_batch_size}, "
          f"grouped gemm {a.grouped_gemm}, dispatcher {a.dispatcher}")
    for line in run.stdout.splitlines():  # the profiler's breakdown, when --extra asked for one
        if "] profile" in line:
            print(line)
    print(f"iterations timed: {len(timed)} | ms/iter: {ms:.1f} | tokens/s: {tokens_per_s:.0f} | "
          f"TFLOP/s/GPU: {tflops:.1f} | MFU: {100.0 * tflops / PEAK_TFLOPS:.1f}%")


if __name__ == "__main__":
    main()
