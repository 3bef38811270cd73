"""Tuning sweep of the SSD Triton kernels: forward+backward (and forward) time per chunk
length, tile length (``block_q``) and warps, beside cuDNN causal attention of the same
width, then the per-kernel breakdown of the fastest setting and of the default.

    python benchmarks/ssd_sweep.py                         # b4 x 4096, 32 heads of 64, 8 groups, state 128
    python benchmarks/ssd_sweep.py --batch 1 --seq 16384 --heads 64

The kernels' defaults (``ssd_triton.KERNEL_CHUNK``, ``_block_q``, four warps) come from this
sweep on an H100 (docs/performance.md). Needs a CUDA GPU with Triton.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from timing import ms_per_call  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--state", type=int, default=128)
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--block-q", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[0], help="pipelining depths; 0 = Triton's default")
    p.add_argument("--repeats", type=int, default=10)
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from megatron.core.ssm.ssd_triton import KERNEL_CHUNK, ssd_triton, supports

    b, s, h, d, g, n = opts.batch, opts.seq, opts.heads, opts.head_dim, opts.groups, opts.state
    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(b, s, h, d, device=dev, dtype=bf16, requires_grad=True)
    dt = F.softplus(torch.randn(b, s, h, device=dev) - 3).requires_grad_()
    A = (-torch.rand(h, device=dev) * 4).requires_grad_()
    B = torch.randn(b, s, g, n, device=dev, dtype=bf16, requires_grad=True)
    C = torch.randn(b, s, g, n, device=dev, dtype=bf16, requires_grad=True)
    D = torch.ones(h, device=dev, requires_grad=True)
    dy = torch.randn_like(x)
    width = h * d
    heads128 = max(1, width // 128)
    q, k, v = (torch.randn(b, heads128, s, 128, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))

    def sdpa():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    print(f"SSD forward+backward, b{b} x {s}, {h} heads of {d}, {g} groups, state {n}, with D, bf16")
    print(f"cuDNN causal attention of width {width} ({heads128} x 128), forward+backward: "
          f"{ms_per_call(sdpa, opts.repeats):.3f} ms")

    def call(chunk, block_q, warps, stages):
        return ssd_triton(x, dt, A, B, C, chunk, D, block_q=block_q, num_warps=warps, num_stages=stages or None)

    def timed(setting):
        def step():
            call(*setting).backward(dy)

        def forward():
            with torch.no_grad():
                call(*setting)

        return ms_per_call(step, opts.repeats), ms_per_call(forward, opts.repeats)

    print("| chunk | block_q | warps | stages | fwd+bwd ms | fwd ms |\n|---|---|---|---|---|---|")
    results = []
    for setting in itertools.product(opts.chunks, opts.block_q, opts.warps, opts.stages):
        chunk, block_q = setting[:2]
        if block_q > chunk or not supports(chunk, d, n):
            continue
        try:
            both, fwd = timed(setting)
        except Exception as err:  # a tile too large for the SM (shared memory, registers) costs one row
            print(f"| {' | '.join(map(str, setting))} | failed: {type(err).__name__}: {str(err)[:80]} | |", flush=True)
            continue
        results.append((both, setting))
        print(f"| {' | '.join(map(str, setting))} | {both:.3f} | {fwd:.3f} |", flush=True)
    best_ms, best = min(results)
    print(f"fastest: chunk {best[0]}, block_q {best[1]}, {best[2]} warps, stages {best[3] or 'default'} "
          f"({best_ms:.3f} ms); the kernels' default chunk is {KERNEL_CHUNK}")
    from torch.profiler import ProfilerActivity, profile

    for setting in sorted({best, (KERNEL_CHUNK, None, 4, 0)}, key=str):
        timed(setting)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call(*setting).backward(dy)
            torch.cuda.synchronize()
        print(f"per kernel, chunk {setting[0]}, block_q {setting[1] or 'default'}, {setting[2]} warps, "
              f"stages {setting[3] or 'default'} (5 calls):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
