"""Where the GPU idles: the gaps between kernels in a torch.profiler trace, charged to the CPU
operations that were running while the GPU waited.

Usage: python benchmarks/trace_gaps.py TRACE_OR_DIRECTORY [--min-gap-ms 0.2] [--top 25]

``pretrain_bench.py --profile`` (or ``pretrain_gpt.py --profile --use-pytorch-profiler``)
writes Chrome traces (``trace_rank0.json``) under its log directory; give the file or a
directory to search. Each gap longer than ``--min-gap-ms`` between the end of all earlier
kernels (memory copies and sets included) and the start of the next is charged to the
innermost CPU operations that cover more than half of it ("A < B": A runs inside B). A gap
no CPU operation covers is host time outside any recorded operation (Python between ops,
the data loader's queue, the profiler itself). A host-bound step shows its GPU idle time
here with the operations whose host cost is to blame.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path
from typing import Dict, List, Tuple

_DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_HOST_CATEGORIES = ("cpu_op", "python_function", "user_annotation")


def find_trace(path: Path) -> Path:
    """``path`` itself, or the last Chrome trace (``*trace*.json[.gz]``) under it."""
    if path.is_file():
        return path
    traces = sorted(p for p in path.rglob("*.json*") if "trace" in p.name)
    if not traces:
        raise SystemExit(f"no Chrome trace (*trace*.json) under {path}: run the benchmark with --profile")
    return traces[-1]


def load_events(path: Path) -> List[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def gaps(events: List[dict], min_gap_us: float) -> Tuple[List[Tuple[float, float]], float]:
    """(start, end) of each idle interval longer than ``min_gap_us``, and the span from the
    first kernel's start to the last kernel's end (microseconds)."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") in _DEVICE_CATEGORIES and "dur" in e)
    if not kernels:
        raise SystemExit("the trace has no device kernels (was CUDA profiled?)")
    out, busy_until = [], kernels[0][1]
    for start, end in kernels[1:]:
        if start - busy_until > min_gap_us:
            out.append((busy_until, start))
        busy_until = max(busy_until, end)
    return out, busy_until - kernels[0][0]


def charge(events: List[dict], idle: List[Tuple[float, float]]) -> Dict[str, float]:
    """Idle microseconds per chain of CPU operations covering each gap."""
    host = sorted((e for e in events if e.get("cat") in _HOST_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
    totals: Dict[str, float] = collections.Counter()
    for start, end in idle:
        length = end - start
        covering = [e for e in host if e["ts"] < end and e["ts"] + e["dur"] > start
                    and min(end, e["ts"] + e["dur"]) - max(start, e["ts"]) > 0.5 * length]
        covering.sort(key=lambda e: e["dur"])
        name = " < ".join(e["name"][:60] for e in covering[:3]) or "(no CPU operation covers it)"
        totals[name] += length
    return totals


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path, help="a Chrome trace, or a directory to search for one")
    p.add_argument("--min-gap-ms", type=float, default=0.2)
    p.add_argument("--top", type=int, default=25)
    opts = p.parse_args(argv)
    path = find_trace(opts.trace)
    events = load_events(path)
    idle, span = gaps(events, opts.min_gap_ms * 1000)
    total = sum(end - start for start, end in idle)
    print(f"{path}: kernels span {span / 1000:.1f} ms; {len(idle)} gaps over {opts.min_gap_ms} ms, "
          f"{total / 1000:.1f} ms idle ({100 * total / span:.1f}%)")
    print("idle ms  CPU operations running during the gaps (innermost first)")
    for name, us in charge(events, idle).most_common(opts.top):
        print(f"{us / 1000:7.1f}  {name}")


if __name__ == "__main__":
    main()
