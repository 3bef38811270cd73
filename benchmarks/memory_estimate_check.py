"""Compare the dry run's memory estimate with the measured peak on a GPU.

    python benchmarks/memory_estimate_check.py                      # the one-GPU reference configs
    python benchmarks/memory_estimate_check.py --configs gpt-350m --iters 3
    python benchmarks/memory_estimate_check.py --configs llama-1.6b --recompute full

For each configuration of ``benchmarks/pretrain_bench.py`` (DESIGN.md section 5) this starts a
fresh process that (1) plans the run exactly as ``--dry-run`` does and keeps the estimate of
rank 0, then (2) trains ``--iters`` iterations through ``pretrain()`` on mock data and reads
``torch.cuda.max_memory_allocated()``. One process per configuration (a crash or an
out-of-memory error costs one row), each with a time limit; the table at the end gives the
estimate by component, the measured peak and measured / estimate. The estimate leaves out
the CUDA context and the allocator's cached-but-free blocks, so it is compared with
max_memory_allocated, not with nvidia-smi. Target: within 15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import pretrain_bench  # the reference configurations and their flags

RESULT = "MEMORY_CHECK_RESULT "
GiB = float(1 << 30)


def config_flags(name: str, iters: int, recompute: Optional[str], mbs: Optional[int], cpu: bool) -> List[str]:
    cfg = pretrain_bench.CONFIGS[name]
    layout = pretrain_bench.Layout(1, recompute=recompute or cfg.recompute)
    mbs = mbs or cfg.mbs
    # a few micro-batches per step are enough to reach the steady-state peak
    gbs = mbs * min(4, max(1, cfg.gbs // mbs))
    return pretrain_bench.pretrain_flags(cfg, layout, cfg.seq, mbs, gbs, iters, 1, cpu, [])


def worker(flags: List[str]) -> None:
    """In the child: estimate, then train and measure; print one JSON line."""
    import torch

    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training.arguments import parse_args
    from megatron.training.dry_run import plan_stages, prepare_args
    from megatron.training.memory_estimate import estimate_memory
    from megatron.training.training import pretrain

    args = prepare_args(parse_args(args=flags))
    plan = plan_stages(args, pretrain_gpt.model_provider)[0]
    est = estimate_memory(args, plan.params, plan.chunks, 0)
    sys.argv = ["pretrain_gpt.py"] + flags
    pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
             ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
    measured = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(RESULT + json.dumps({"weights": est.weights, "grads": est.grads, "optimizer": est.optimizer,
                               "activations": est.activations, "total": est.total, "measured": measured,
                               "params": plan.params.total}), flush=True)


def run_config(name: str, opts) -> Dict:
    flags = config_flags(name, opts.iters, opts.recompute, opts.mbs, opts.cpu)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--", *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log_path = Path(opts.log_dir) / f"memory_{name}.log"
    print(f"== {name} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"config": name, "status": f"timed out after {opts.timeout} s"}
    text = log_path.read_text()
    for line in text.splitlines():
        if line.startswith(RESULT):
            return {"config": name, "status": "ok" if rc == 0 else f"exit {rc}", **json.loads(line[len(RESULT):])}
    tail = " | ".join(text.strip().splitlines()[-3:])[-300:]
    return {"config": name, "status": f"exit {rc}: {tail}"}


def table(rows: List[Dict]) -> str:
    head = (f"{'config':<12} {'params':>14} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
            f"{'estimate':>9} {'measured':>9} {'ratio':>6}  status")
    out = [head, "-" * len(head)]
    for r in rows:
        if "total" not in r:
            out.append(f"{r['config']:<12} {'':>14} {'':>8} {'':>8} {'':>8} {'':>8} {'':>9} {'':>9} {'':>6}  "
                       f"{r['status']}")
            continue
        measured = r.get("measured")
        ratio = f"{measured / r['total']:.3f}" if measured else "-"
        measured_text = f"{measured / GiB:.2f}" if measured else "-"
        out.append(f"{r['config']:<12} {r['params']:>14,} {r['weights'] / GiB:>8.2f} {r['grads'] / GiB:>8.2f} "
                   f"{r['optimizer'] / GiB:>8.2f} {r['activations'] / GiB:>8.2f} {r['total'] / GiB:>9.2f} "
                   f"{measured_text:>9} {ratio:>6}  {r['status']}")
    out.append("(GiB; ratio = measured max_memory_allocated / estimate; target 0.85-1.15)")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="all",
                        help="comma-separated names from pretrain_bench.CONFIGS; all = the one-GPU ones")
    parser.add_argument("--iters", type=int, default=3, help="training iterations per configuration")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default=None,
                        help="override each configuration's recompute")
    parser.add_argument("--mbs", type=int, default=None, help="override the micro-batch size")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    parser.add_argument("--log-dir", default=None, help="where each run's log goes (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--cpu", action="store_true", help="CPU smoke test (no measurement): gloo, fp32")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("flags", nargs="*", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        worker(opts.flags)
        return 0
    if opts.log_dir is None:
        import tempfile

        opts.log_dir = tempfile.mkdtemp(prefix="memory_check_")
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)
    names = pretrain_bench.SINGLE_GPU_CONFIGS if opts.configs == "all" else opts.configs.split(",")
    unknown = [n for n in names if n not in pretrain_bench.CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; known: {sorted(pretrain_bench.CONFIGS)}")
    rows = []
    for name in names:
        rows.append(run_config(name, opts))
        print(table(rows[-1:]).splitlines()[2], flush=True)
    print("\n" + table(rows))
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
