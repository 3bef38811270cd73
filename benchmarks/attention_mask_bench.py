"""Masked attention as BERT runs it: SDPA forward+backward per backend and mask form.

    python benchmarks/attention_mask_bench.py                   # BERT-large: b16, 16 heads, s512, d64, bf16
    python benchmarks/attention_mask_bench.py --batch 8 --seq 1024 --dropout 0.0
    python benchmarks/attention_mask_bench.py --cpu             # tiny shape, fp32, the table only

BERT's attention takes a padding mask: keys past each sequence's length are hidden. Which
SDPA kernel serves that call (cuDNN, flash, memory-efficient, math) depends on the mask's
form and on dropout, and decides most of the attention time of a BERT step. Each row
times one mask form (none, the boolean key mask the model passes, the same as an additive
bias, an additive [b, h, s, s] bias) with the project's backend priority and with each
backend forced; a backend that refuses the call says so instead of a time. Sequence
lengths are drawn between 80% of the length and the length (seeded), as in BERT batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron.core.fusions.sdpa_backends import SDPA_BACKEND_PRIORITY  # noqa: E402
from timing import ms_per_call  # noqa: E402

FORCED = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def masks(batch: int, heads: int, seq: int, dtype: torch.dtype, device) -> Dict[str, Optional[torch.Tensor]]:
    """The mask forms, SDPA's convention (bool: True = attend; additive: -inf = hidden)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(int(0.8 * seq), seq + 1, (batch,), generator=g).to(device)
    keep = (torch.arange(seq, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    additive = torch.zeros(batch, 1, 1, seq, device=device, dtype=dtype).masked_fill(~keep, float("-inf"))
    return {"none": None, "bool key mask": keep, "additive key mask": additive,
            "additive [b,h,s,s]": additive.expand(batch, heads, seq, seq).contiguous()}


def row(q, k, v, mask, dropout: float, backends: Sequence[SDPBackend], repeats: int) -> str:
    """'1.234 ms' or 'refused: <reason>' for SDPA fwd+bwd under ``backends``."""
    def step():
        with sdpa_kernel(list(backends)):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out.float().sum().backward()

    try:
        return f"{ms_per_call(step, repeats, cuda=q.is_cuda):.3f} ms"
    except RuntimeError as err:
        return "refused: " + str(err).strip().splitlines()[0][:80]


def table(batch: int, heads: int, seq: int, head_dim: int, dropouts: Sequence[float], repeats: int,
          cpu: bool) -> List[str]:
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    forced = ["math"] if cpu else ["cudnn", "flash", "efficient"]
    lines = [f"SDPA forward+backward, b{batch} x {heads} heads x s{seq} x d{head_dim}, {dtype}, {device}",
             "| dropout | mask | priority | " + " | ".join(forced) + " |",
             "|---|---|---|" + "---|" * len(forced)]
    for dropout in dropouts:
        for name, mask in masks(batch, heads, seq, dtype, device).items():
            cells = [row(q, k, v, mask, dropout, SDPA_BACKEND_PRIORITY, repeats)]
            cells += [row(q, k, v, mask, dropout, [FORCED[b]], repeats) for b in forced]
            lines.append(f"| {dropout} | {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="a tiny fp32 shape on CPU (math backend): checks the script")
    opts = p.parse_args(argv)
    if not opts.cpu and not torch.cuda.is_available():
        print("no CUDA GPU: pass --cpu to check the script on a tiny shape", file=sys.stderr)
        return 2
    if opts.cpu:
        opts.batch, opts.heads, opts.seq, opts.head_dim, opts.repeats = 2, 2, 32, 16, 1
    print("\n".join(table(opts.batch, opts.heads, opts.seq, opts.head_dim, opts.dropout, opts.repeats, opts.cpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
