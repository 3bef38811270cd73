"""The per-rank attention work of context parallelism, timed on one GPU: the blocks one
rank of a p2p ring computes (forward + backward) on the plain fp32 math and on the cuDNN
and flash kernels, against the full-sequence attention one rank runs under a2a (all the sequence,
1/cp of the heads) with cuDNN and flash SDPA. No communication: it shows what the blocks
cost, which bounds the ring whatever the overlap.

    python benchmarks/cp_block_bench.py                    # 8B-shaped heads, seq 32k, CP2
    python benchmarks/cp_block_bench.py --seq 16384 --cp 4 --no-math
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import ms_per_call  # noqa: E402

from megatron.core.transformer.context_parallel import block_kernels  # noqa: E402
from megatron.core.transformer.context_parallel.layout import local_segments  # noqa: E402
from megatron.core.transformer.context_parallel.p2p import Ring, ring_attention  # noqa: E402


def _ring_step(q, k, v, cp: int, rank: int, use_kernels: bool, scale: float):
    """One rank's ring forward + backward with sends and receives that do nothing: the
    rank's own K/V stand in for every member's; the block plan follows the real ring."""
    import megatron.core.transformer.context_parallel.p2p as p2p

    segments = [local_segments(r, cp, q.shape[3]) for r in range(cp)]
    ring = Ring(group=None, members=list(range(cp)), index=rank, segments=segments)
    saved = p2p.ring_send_recv_start, p2p.ring_shift
    p2p.ring_send_recv_start = lambda tensor, ring: (tensor, [])
    p2p.ring_shift = lambda tensor, ring: tensor
    try:
        out = ring_attention(q, k, v, ring, True, None, scale, 0.0, use_kernels=use_kernels)
        out.backward(torch.ones_like(out))
    finally:
        p2p.ring_send_recv_start, p2p.ring_shift = saved


def _profile(step) -> None:
    """The CUDA kernels of one call of ``step`` (after a warm-up), by total time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-math", action="store_true", help="skip the fp32-math ring row (slow at long sequences)")
    p.add_argument("--profile", action="store_true", help="also print the kernels of one ring step of rank 0")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("cp_block_bench times CUDA kernels: run it on a GPU")
    dev, bf16, hn = "cuda", torch.bfloat16, args.head_dim
    local, g = args.seq // args.cp, args.heads // args.groups
    scale = hn ** -0.5
    q = torch.randn(1, args.groups, g, local, hn, device=dev, dtype=bf16, requires_grad=True)
    k, v = (torch.randn(1, args.groups, 1, local, hn, device=dev, dtype=bf16, requires_grad=True) for _ in range(2))
    assert block_kernels.supported(q, 0.0)
    rows = []
    chosen = block_kernels.cuda_backend
    for rank in (0, args.cp - 1):
        for backend in ("cudnn", "flash"):
            block_kernels.cuda_backend = lambda q, b=backend: b
            rows.append((f"ring rank {rank}, {backend} blocks",
                         ms_per_call(lambda: _ring_step(q, k, v, args.cp, rank, True, scale), args.repeats)))
        if not args.no_math:
            rows.append((f"ring rank {rank}, fp32 math", ms_per_call(lambda: _ring_step(q, k, v, args.cp, rank, False, scale),
                                                                     1, warmup=1)))
    block_kernels.cuda_backend = chosen
    if args.profile:
        _profile(lambda: _ring_step(q, k, v, args.cp, 0, True, scale))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads = args.heads // args.cp
    qa, ka, va = (torch.randn(1, heads, args.seq, hn, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))
    for name, backend in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def a2a_step(backend=backend):
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(qa, ka, va, is_causal=True).sum().backward()
        rows.append((f"a2a rank: {heads} heads x {args.seq} causal, {name} SDPA", ms_per_call(a2a_step, args.repeats)))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: seq {args.seq}, CP {args.cp}, "
          f"{args.heads} heads / {args.groups} groups x {hn}, bf16, forward + backward")
    print("| per-rank attention work | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
