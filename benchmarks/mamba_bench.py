"""Mamba-2 and hybrid speed on one GPU: the SSD scan against cuDNN attention, and ~1.3B
models (hybrid, pure Mamba-2, transformer) at growing sequence lengths.

    python benchmarks/mamba_bench.py                       # everything, one table at the end
    python benchmarks/mamba_bench.py --only kernel         # SSD fwd+bwd (each backend) vs causal SDPA, seq 4096
    python benchmarks/mamba_bench.py --only models --seqs 4096 16384 --iters 12 --timeout 900
    python benchmarks/mamba_bench.py --only models --seqs 4096 --recompute none full   # both ways

Every measurement runs in its own process with a timeout (an out-of-memory or a hang costs
one row, not the run). The model rows launch pretrain_hybrid.py / pretrain_gpt.py on mock
data, bf16, with the same tokens per step at every sequence length (--tokens, 65,536 by
default: global batch = tokens / seq) cut into micro-batches of --micro-tokens (16,384:
micro-batch = micro-tokens / seq, at least one sequence), and read Megatron's iteration log
lines (the first --warmup iterations dropped). A whole step's tokens in one micro-batch do
not fit one GPU at this size (`--dry-run` estimates 151 GiB for the transformer at 65,536
tokens), so the step accumulates gradients over micro-batches, and with --recompute full
(the default; needed for a 65,536-token sequence) every model keeps only its layers' inputs.
TFLOP/s are the log line's (hybrid FLOPs: megatron/training/hybrid_flops.py) and MFU is
against the dense bf16 peak of DESIGN.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pretrain_bench import PEAK_TFLOPS, TIMED_OUT, _stream, environment, parse_log, steady_state  # noqa: E402
from timing import ms_per_call  # noqa: E402

HIDDEN, VOCAB = 2048, 50304
_COMMON = [
    "--hidden-size", str(HIDDEN), "--num-attention-heads", "16", "--kv-channels", "128",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--bf16", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
    "--lr", "1e-4", "--log-interval", "1", "--log-throughput", "--eval-iters", "0",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--num-workers", "1",
]
_MAMBA = ["--is-hybrid-model", "--position-embedding-type", "none", "--mamba-state-dim", "128",
          "--mamba-head-dim", "64", "--mamba-num-groups", "8", "--squared-relu", "--ffn-hidden-size", "8192"]
# ~1.3B each at hidden 2048 (embeddings included): 40 hybrid layers with 3 attention layers
# (~8%, Megatron's recommended ratio) and 17 MLP layers; 40 Mamba-2 layers; 24 transformer layers.
MODELS: Dict[str, tuple] = {
    "hybrid-1.3b": ("pretrain_hybrid.py", _MAMBA + ["--num-layers", "40", "--hybrid-attention-ratio", "0.08",
                                                    "--hybrid-mlp-ratio", "0.42"]),
    "mamba2-1.3b": ("pretrain_hybrid.py", _MAMBA + ["--num-layers", "40", "--hybrid-layer-pattern", "M" * 40]),
    "transformer-1.3b": ("pretrain_gpt.py", ["--num-layers", "24", "--ffn-hidden-size", "8192",
                                             "--position-embedding-type", "rope"]),
}


def kernel_bench(seq: int = 4096, batch: int = 4, repeats: int = 20) -> dict:
    """SSD scan fwd+bwd (width 2048: 32 heads of 64, 8 groups, state 128, chunk 128) on each
    GPU backend (our Triton kernels; torch.compile of the chunked scan) vs cuDNN causal SDPA
    (width 2048: 16 heads of 128), bf16, milliseconds per fwd+bwd. Runs in this process; a
    backend that fails gets its error instead of a time."""
    import torch

    from megatron.core.ssm.ssd import ssd_scan

    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(batch, seq, 32, 64, device=dev, dtype=bf16, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(batch, seq, 32, device=dev) - 3).requires_grad_()
    A = (-torch.rand(32, device=dev) * 4).requires_grad_()
    B = torch.randn(batch, seq, 8, 128, device=dev, dtype=bf16, requires_grad=True)
    C = torch.randn(batch, seq, 8, 128, device=dev, dtype=bf16, requires_grad=True)
    q, k, v = (torch.randn(batch, 16, seq, 128, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))

    def sdpa_step():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    out = {}
    for backend in ("triton", "compile"):
        def ssd_step(backend=backend):
            ssd_scan(x, dt, A, B, C, 128, backend=backend).sum().backward()

        try:
            out[f"ssd_{backend}_ms"] = ms_per_call(ssd_step, repeats)
        except Exception as err:  # one backend failing must not cost the other's number
            out[f"ssd_{backend}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    try:  # the Triton scan recomputing the chunks' entering states in backward (less memory)
        from megatron.core.ssm.ssd_triton import ssd_triton

        out["ssd_triton_recompute_states_ms"] = ms_per_call(
            lambda: ssd_triton(x, dt, A, B, C, 128, keep_states=False).sum().backward(), repeats)
    except Exception as err:
        out["ssd_triton_recompute_states_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    out["cudnn_sdpa_ms"] = ms_per_call(sdpa_step, repeats)
    # Causal attention FLOPs (fwd+bwd, halved for the mask) of the same width: a yardstick.
    out["sdpa_tflops"] = 3 * 2 * 2 * batch * seq * seq * 2048 / 2 / out["cudnn_sdpa_ms"] / 1e9
    return out


RECOMPUTE = {"none": [], "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                   "--recompute-num-layers", "1"]}


def batch_shape(seq: int, tokens: int, micro_tokens: int) -> tuple:
    """(micro-batch, global batch) in sequences: ``tokens`` per step (at least one sequence)
    in micro-batches of ``micro_tokens`` (at least one sequence)."""
    gbs = max(1, tokens // seq)
    mbs = max(1, min(gbs, micro_tokens // seq))
    if gbs % mbs:
        raise ValueError(f"{tokens} tokens per step at seq {seq} ({gbs} sequences) do not split into micro-batches "
                         f"of {mbs}: choose --tokens a multiple of --micro-tokens")
    return mbs, gbs


def model_row(name: str, seq: int, tokens: int, iters: int, warmup: int, timeout: float, extra: List[str],
              log_dir: Optional[str] = None, micro_tokens: int = 16384, recompute: str = "full") -> dict:
    script, flags = MODELS[name]
    mbs, gbs = batch_shape(seq, tokens, micro_tokens)
    argv = flags + _COMMON + RECOMPUTE[recompute] + extra + [
        "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--micro-batch-size", str(mbs),
        "--global-batch-size", str(gbs), "--train-iters", str(iters), "--lr-warmup-iters", "0",
    ]
    log_path = Path(log_dir or tempfile.gettempdir()) / f"mamba_bench_{name}_{seq}_{recompute}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rc, text = _stream([sys.executable, str(REPO / script), *argv], log_path, quiet=True, timeout=timeout)
    parsed = parse_log(text)
    ms, tflops, measured = steady_state(parsed.lines, warmup)
    row = {"model": name, "seq": seq, "mbs": mbs, "gbs": gbs, "recompute": recompute, "ms_per_iter": ms,
           "tflops": tflops, "log": str(log_path),
           "max_allocated_gb": None if parsed.max_allocated_mb is None else parsed.max_allocated_mb / 1024.0}
    if ms:
        row["tokens_per_s"] = gbs * seq / (ms / 1000.0)
    row["status"] = "ok" if ms else ("timed out" if rc == TIMED_OUT else "out of memory" if "OutOfMemory" in text
                                     else f"failed (exit {rc})")
    if not ms:
        # How far the run got: the iterations it logged and its last line.
        lines = [line for line in text.splitlines() if line.strip()]
        row["progress"] = f"{len(parsed.lines)} iteration line(s); last line: {lines[-1][:160] if lines else '-'}"
    return row


def _in_subprocess(args: Sequence[str], timeout: float) -> Optional[dict]:
    """Run this script with ``args`` in a child process; its last stdout line is JSON."""
    try:
        done = subprocess.run([sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timed out"}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"status": f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def report(kernel: Optional[dict], rows: List[dict]) -> str:
    lines = [f"environment: {json.dumps(environment())}"]
    if kernel is not None:
        ssd = "; ".join(f"{name} {_fmt(kernel.get(f'ssd_{name}_ms'), '.2f')} ms"
                        f"{' (' + kernel[f'ssd_{name}_error'] + ')' if f'ssd_{name}_error' in kernel else ''}"
                        for name in ("triton", "triton_recompute_states", "compile"))
        lines.append(f"SSD scan fwd+bwd (seq 4096, width 2048, state 128): {ssd}; "
                     f"cuDNN causal SDPA fwd+bwd (16 x 128): {_fmt(kernel.get('cudnn_sdpa_ms'), '.2f')} ms "
                     f"({_fmt(kernel.get('sdpa_tflops'), '.0f')} TFLOP/s) {kernel.get('status', '')}")
    lines.append("| model | seq | mbs x micro-batches | recompute | ms/iter | tokens/s | TFLOP/s | MFU | "
                 "vs transformer | peak GB | status |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["seq"], r["recompute"]): r.get("tokens_per_s") for r in rows if r["model"] == "transformer-1.3b"}
    for r in rows:
        tps, ref = r.get("tokens_per_s"), base.get((r["seq"], r["recompute"]))
        ratio = f"{tps / ref:.2f}x" if tps and ref else "-"
        mfu = f"{100 * r['tflops'] / PEAK_TFLOPS:.1f}%" if r.get("tflops") else "-"
        lines.append(f"| {r['model']} | {r['seq']} | {r['mbs']} x {r['gbs'] // r['mbs']} | {r['recompute']} | "
                     f"{_fmt(r.get('ms_per_iter'), '.1f')} | {_fmt(tps, ',.0f')} | {_fmt(r.get('tflops'), '.1f')} | "
                     f"{mfu} | {ratio} | {_fmt(r.get('max_allocated_gb'), '.1f')} | {r['status']} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("kernel", "models"), default=None)
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--tokens", type=int, default=65536, help="Tokens per step at every sequence length.")
    p.add_argument("--micro-tokens", type=int, default=16384,
                   help="Tokens per micro-batch (at least one sequence); the step accumulates the rest.")
    p.add_argument("--recompute", nargs="+", choices=list(RECOMPUTE), default=["full"],
                   help="Activation recompute of every model row; several values run each row once per value.")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1200.0, help="Seconds per measurement (its own process).")
    p.add_argument("--extra", default="", help="More flags for every model run, e.g. '--no-check-for-nan-in-loss-and-grad'.")
    p.add_argument("--log-dir", default=None, help="Where each model run's log goes (default: the temporary directory).")
    p.add_argument("--_kernel_child", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts._kernel_child:
        print(json.dumps(kernel_bench()))
        return 0
    kernel = None if opts.only == "models" else _in_subprocess(["--_kernel_child"], opts.timeout)
    rows = []
    if opts.only != "kernel":
        for recompute in opts.recompute:
            for seq in opts.seqs:
                for name in opts.models:
                    rows.append(model_row(name, seq, opts.tokens, opts.iters, opts.warmup, opts.timeout,
                                          opts.extra.split(), opts.log_dir, opts.micro_tokens, recompute))
                    print(json.dumps(rows[-1]), flush=True)
    print(report(kernel, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
