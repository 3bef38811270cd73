"""Weight-gradient GEMMs accumulated into fp32 main_grad: which cuBLAS call is fastest per shape.

Usage (one GPU): python benchmarks/wgrad_bench.py [--tokens 8192] [--reps 20]

With gradient accumulation fusion (the default) each linear's backward adds
grad_output^T @ input into the fp32 ``main_grad`` buffer of its weight. Variants timed:
- ``addmm fp32 out``: ``torch.addmm(main_grad, a, b, out_dtype=float32, out=main_grad)``, the
  accumulation inside the GEMM (fp32 output and fp32 C operand);
- ``mm fp32 + add``: an fp32-output GEMM, then ``main_grad.add_`` (same precision);
- ``mm bf16 + add``: a bf16-output GEMM, then ``main_grad.add_`` (the grad rounded to bf16 first).
For each shape (the linears of the benchmark models) it prints TFLOP/s of each variant and the
GEMM kernel cuBLAS picked, so a slow kernel family shows up by name.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from timing import ms_per_call

SHAPES = {  # (out features, in features) of each linear
    "bert-large": [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)],
    "gpt-1.7b": [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)],
    "llama-1.6b": [(3072, 2048), (2048, 2048), (11264, 2048), (2048, 5632)],
    "gpt2-124m": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
}


def variants(main, grad, inp):
    a, b = grad.t(), inp
    return {
        "addmm fp32 out": lambda: torch.addmm(main, a, b, out_dtype=torch.float32, out=main),
        "mm fp32 + add": lambda: main.add_(torch.mm(a, b, out_dtype=torch.float32)),
        "mm bf16 + add": lambda: main.add_(torch.mm(a, b)),
    }


def gemm_kernel(fn) -> str:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    gemms = [n for n in names if "gemm" in n.lower() or "nvjet" in n or "cutlass" in n]
    return (gemms or names or ["?"])[0][:60]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=20)
    opts = p.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"tokens {opts.tokens}")
    print(f"{'model':<11} {'out x in':>12} | {'variant':<15} {'ms':>7} {'TFLOP/s':>8} | kernel")
    for model, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            grad = torch.randn(opts.tokens, out_f, device="cuda", dtype=torch.bfloat16)
            inp = torch.randn(opts.tokens, in_f, device="cuda", dtype=torch.bfloat16)
            main_grad = torch.zeros(out_f, in_f, device="cuda", dtype=torch.float32)
            for name, fn in variants(main_grad, grad, inp).items():
                ms = ms_per_call(fn, opts.reps)
                tflops = 2 * opts.tokens * out_f * in_f / ms / 1e9
                print(f"{model:<11} {f'{out_f}x{in_f}':>12} | {name:<15} {ms:7.3f} {tflops:8.1f} | {gemm_kernel(fn)}",
                      flush=True)


if __name__ == "__main__":
    main()
