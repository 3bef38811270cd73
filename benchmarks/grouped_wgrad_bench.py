"""The experts' weight gradients into fp32 main_grad: grouped GEMM + add against the Triton
kernel that adds inside the GEMM (``megatron/core/transformer/moe/grouped_wgrad_triton.py``).

Usage (one GPU): python benchmarks/grouped_wgrad_bench.py [--reps 20] [--configs all]

Per micro-batch and MoE linear, the path without the kernel runs ``torch._grouped_mm(dy^T,
x, offs)`` (a bf16 [G, out, in] gradient) and then the DDP hook's ``main_grad.add_`` per
expert; the kernel reads each main_grad tile once, adds its fp32 product and writes it
back. Shapes: the fc1 and fc2 of ``moe_bench.py``'s two models at their token counts (seq
4096, micro-batch 1; routing drawn at random, top-k of G). Prints ms per call for the
reference and for each tile shape of the kernel, the largest difference from an fp32
product, and the device and versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from timing import ms_per_call  # noqa: E402

MODELS = {  # name: (experts, top-k, hidden, expert ffn hidden (fc1 is 2x: SwiGLU))
    "mixtral-8x-top2": (8, 2, 2048, 5632),
    "deepseek-64x-top6": (64, 6, 2048, 1408),
}
TILES = [  # (BLOCK_N, BLOCK_K, BLOCK_T, num_warps, num_stages)
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (128, 128, 32, 4, 5), (64, 128, 64, 4, 4),
]


def _counts(tokens: int, experts: int, topk: int) -> torch.Tensor:
    choice = torch.rand(tokens, experts, device="cuda").topk(topk, dim=-1).indices.flatten()
    return torch.bincount(choice, minlength=experts)


def _main_grads(experts: int, out_f: int, in_f: int):
    """main_grads as the DDP buffer places them: one fp32 buffer, experts in reverse order."""
    buffer = torch.randn(experts * out_f * in_f, device="cuda")
    views = [buffer[(experts - 1 - e) * out_f * in_f:][:out_f * in_f].view(out_f, in_f) for e in range(experts)]
    offsets = torch.tensor([v.storage_offset() for v in views], device="cuda", dtype=torch.int64)
    return buffer, views, offsets


def main() -> None:
    from megatron.core.transformer.moe.grouped_wgrad_triton import grouped_wgrad_accumulate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seq", type=int, default=4096)
    opts = p.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
    print(f"{'model':<18} {'linear':<7} {'variant':<26} {'ms':>8} {'TFLOP/s':>8} {'max err':>9}")
    torch.manual_seed(0)
    for model, (experts, topk, hidden, ffn) in MODELS.items():
        counts = _counts(opts.seq, experts, topk)
        ends = counts.cumsum(0).to(torch.int32)
        rows = int(ends[-1])
        for linear, (out_f, in_f) in (("fc1", (2 * ffn, hidden)), ("fc2", (hidden, ffn))):
            dy = torch.randn(rows, out_f, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
            buffer, views, offsets = _main_grads(experts, out_f, in_f)
            flops = 2.0 * rows * out_f * in_f

            def reference():
                grads = torch._grouped_mm(dy.t(), x, offs=ends)
                for view, grad in zip(views, grads.unbind(0)):
                    view.add_(grad)

            rows_of = torch.split(torch.arange(rows, device="cuda"), counts.tolist())
            exact = [dy[r].float().t() @ x[r].float() for r in rows_of]
            variants = [("grouped_mm bf16 + add", reference)]
            for tile in TILES:
                bn, bk, bt, warps, stages = tile
                variants.append((f"triton {bn}x{bk}x{bt} w{warps} s{stages}",
                                 lambda bn=bn, bk=bk, bt=bt, w=warps, s=stages: grouped_wgrad_accumulate(
                                     buffer, offsets, dy, x, ends, block_n=bn, block_k=bk, block_t=bt,
                                     num_warps=w, num_stages=s)))
            for name, fn in variants:
                buffer.zero_()
                try:
                    fn()
                    err = max((v - e).abs().max().item() for v, e in zip(views, exact))
                    ms = ms_per_call(fn, repeats=opts.reps)
                except Exception as exc:  # a tile shape that does not fit this GPU's shared memory
                    print(f"{model:<18} {linear:<7} {name:<26} failed: {str(exc).splitlines()[0][:60]}")
                    continue
                print(f"{model:<18} {linear:<7} {name:<26} {ms:8.3f} {flops / ms / 1e9:8.1f} {err:9.2e}")


if __name__ == "__main__":
    main()
