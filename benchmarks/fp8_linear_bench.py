"""FP8 linear against bf16, forward + backward, at the transformer-layer GEMM shapes of a model.

    python benchmarks/fp8_linear_bench.py                      # gpt-1.7b shapes, tokens 8192
    python benchmarks/fp8_linear_bench.py --tokens 8192 --shapes 2048x6144 2048x2048 2048x8192 8192x2048
    python benchmarks/fp8_linear_bench.py --profile            # also the top kernels of the FP8 linears
    python benchmarks/fp8_linear_bench.py --torchao tensorwise # also torchao's Float8Linear, compiled

Times one forward and backward of ``y = x W^T`` (x [tokens, K], W [N, K], bf16) with CUDA events
(median of --iters after --warmup), through ``torch.nn.functional.linear`` and through
``megatron.core.fp8.linear.fp8_linear`` (``--recipe`` tensorwise or delayed, hybrid format),
several micro-batches per weight so the per-step weight quantization is amortized as in training
(``--microbatches``, an optimizer step between groups). Prints one row per shape and the sum.

``--torchao RECIPE`` adds torchao's float8 training (``torchao.float8.Float8Linear`` with its
``tensorwise`` or ``rowwise`` recipe, under ``torch.compile`` as torchao intends) on the same
tensors: the measurement behind the choice between ``torch._scaled_mm`` and torchao
(docs/fp8.md). torchao is not a dependency of the framework; install it to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron.core.fp8.gemm import SCALED_MM  # noqa: E402
from megatron.core.fp8.linear import fp8_linear  # noqa: E402
from megatron.core.fp8.recipe import Fp8Recipe  # noqa: E402
from megatron.core.fp8.scaling import Fp8Scaling  # noqa: E402

try:
    from megatron.core.fp8.weight_cache import weights_updated  # noqa: E402
except ImportError:  # an older checkout without the cache
    def weights_updated():
        pass


def _time(step, microbatches: int, warmup: int, iters: int) -> float:
    """Median ms per micro-batch of ``step()`` over groups of ``microbatches`` calls."""
    for _ in range(warmup):
        weights_updated()
        for _ in range(microbatches):
            step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        weights_updated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(microbatches):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / microbatches)
    return statistics.median(times)


def _torchao_step(x, w, g, recipe: str):
    """A step of torchao's Float8Linear holding a copy of ``w``, compiled."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    module = torch.compile(convert_to_float8_training(torch.nn.Sequential(linear),
                                                      config=Float8LinearConfig.from_recipe_name(recipe)))

    def step():
        module(x).backward(g)

    return module, step


def bench_shape(tokens: int, k: int, n: int, recipe: str, opts):
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    g = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    scaling = Fp8Scaling(Fp8Recipe(recipe=recipe), device=torch.device("cuda"))

    def bf16_step():
        torch.nn.functional.linear(x, w).backward(g)

    def fp8_step():
        fp8_linear(x, w, scaling, backend=SCALED_MM).backward(g)

    with torch.no_grad():
        ref = torch.nn.functional.linear(x, w).float()
        out = fp8_linear(x, w, scaling, backend=SCALED_MM).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    t_bf16 = _time(bf16_step, opts.microbatches, opts.warmup, opts.iters)
    t_fp8 = _time(fp8_step, opts.microbatches, opts.warmup, opts.iters)
    t_torchao = None
    if opts.torchao:
        _, torchao_step = _torchao_step(x, w, g, opts.torchao)
        t_torchao = _time(torchao_step, opts.microbatches, opts.warmup, opts.iters)
    flops = 6 * tokens * k * n
    if opts.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(opts.microbatches):
                fp8_step()
            torch.cuda.synchronize()
        print(f"--- FP8 kernels, {tokens}x{k} @ {n}x{k}^T, {opts.microbatches} micro-batches")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
        print("--- host time by operator")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return t_bf16, t_fp8, flops, rel, t_torchao


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="rows of x: micro-batch x sequence length")
    p.add_argument("--shapes", nargs="+", default=["2048x6144", "2048x2048", "2048x8192", "8192x2048"],
                   help="KxN of each linear (input x output features); default: gpt-1.7b's layer")
    p.add_argument("--recipe", choices=["tensorwise", "delayed"], default="tensorwise")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="print the kernels and the host time of the FP8 linears")
    p.add_argument("--torchao", choices=["tensorwise", "rowwise"], default=None,
                   help="also time torchao's Float8Linear with this recipe (torch.compile'd)")
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU with FP8 GEMMs")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; recipe {opts.recipe}; tokens {opts.tokens}")
    torchao_head = f" | torchao {opts.torchao} ms | torchao/bf16" if opts.torchao else ""
    print(f"{'K x N':>12} | {'bf16 ms':>8} | {'fp8 ms':>8} | {'fp8/bf16':>8} | {'bf16 TF/s':>9} | {'fp8 TF/s':>8} | "
          f"rel err{torchao_head}")
    total_bf16 = total_fp8 = total_torchao = 0.0
    for shape in opts.shapes:
        k, n = (int(v) for v in shape.split("x"))
        t_bf16, t_fp8, flops, rel, t_torchao = bench_shape(opts.tokens, k, n, opts.recipe, opts)
        total_bf16, total_fp8 = total_bf16 + t_bf16, total_fp8 + t_fp8
        torchao_cells = ""
        if t_torchao is not None:
            total_torchao += t_torchao
            torchao_cells = f" | {t_torchao:8.3f} | {t_bf16 / t_torchao:7.2f}x"
        print(f"{shape:>12} | {t_bf16:8.3f} | {t_fp8:8.3f} | {t_bf16 / t_fp8:7.2f}x | "
              f"{flops / t_bf16 / 1e9:9.0f} | {flops / t_fp8 / 1e9:8.0f} | {rel:.1e}{torchao_cells}")
    torchao_sum = f" | {total_torchao:8.3f} | {total_bf16 / total_torchao:7.2f}x" if opts.torchao else ""
    print(f"{'sum':>12} | {total_bf16:8.3f} | {total_fp8:8.3f} | {total_bf16 / total_fp8:7.2f}x |{torchao_sum}")


if __name__ == "__main__":
    main()
