"""Benchmark the real training entry point on the reference configurations.

    python benchmarks/pretrain_bench.py --configs all
    python benchmarks/pretrain_bench.py --configs llama-1.6b --recompute full --mbs 4 --gbs 64
    python benchmarks/pretrain_bench.py --configs llama3-8b --nproc 8 --tp 2 --distributed-optimizer --overlap
    python benchmarks/pretrain_bench.py --configs llama3-8b --nproc 8 --tp 2 --fsdp2   # the same under FSDP2
    python benchmarks/pretrain_bench.py --configs tiny --cpu          # whole driver on CPU, seconds
    python benchmarks/pretrain_bench.py --configs gpt-350m --profile  # + where the GPU time goes
    python benchmarks/pretrain_bench.py --configs bert-large          # pretrain_bert.py; not in "all"
    python benchmarks/pretrain_bench.py --configs gpt-1.7b,llama-1.6b --fp8 tensorwise  # bf16 and FP8 rows

For each configuration this launches ``pretrain_gpt.py`` (plain ``python`` for one process,
``torchrun`` for more) on mock data, reads Megatron's iteration log lines, drops the first
``--warmup`` iterations and reports ms/iter, tokens/s (total and per GPU), TFLOP/s per GPU,
MFU against the dense bf16 peak, peak memory and the backends the run logged. FLOPs are the
ones the log line uses (megatron/training/flops.py); the driver computes them exactly from the
same flags, so a CPU run, whose log rounds its TFLOP/s to 0.0, still gets a real figure.

With ``--profile`` each run also profiles two iterations with torch.profiler (or the ones
``--profile-steps S:E`` names) and the report ends with the device-time breakdown each run
logged; the profiled iterations and the one after them (which writes the trace) are left out of
the timing averages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
PEAK_TFLOPS = 989.4  # H100/H200 dense bf16, the yardstick DESIGN.md fixes for MFU

# ---------------------------------------------------------------------------------------------
# Reference configurations (DESIGN.md section 5). Shapes only; the layout comes from the flags.
# ---------------------------------------------------------------------------------------------

_GPT = ["--position-embedding-type", "learned_absolute"]
_LLAMA = [
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
]


@dataclass(frozen=True)
class BenchConfig:
    model_flags: List[str]
    vocab_size: int
    seq: int
    mbs: int
    gbs: int
    nproc: int = 1  # processes the default layout needs; "all" runs the one-process ones
    recompute: str = "none"
    note: str = ""
    family: str = "gpt"  # "bert": pretrain_bert.py with a generated WordPiece vocabulary


CONFIGS: Dict[str, BenchConfig] = {
    "gpt2-124m": BenchConfig(
        _GPT + ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12"],
        vocab_size=50257, seq=1024, mbs=16, gbs=64, note="GPT-2 small"),
    "gpt-350m": BenchConfig(
        _GPT + ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16"],
        vocab_size=50257, seq=2048, mbs=8, gbs=64, note="vocab pads to 50304"),
    "llama-1.6b": BenchConfig(
        _LLAMA + ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
                  "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "5632"],
        vocab_size=131072, seq=4096, mbs=2, gbs=32, recompute="selective"),
    "gpt-1.7b": BenchConfig(
        _GPT + ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
                "--ffn-hidden-size", "8192", "--untie-embeddings-and-output-weights"],
        vocab_size=131072, seq=4096, mbs=2, gbs=32, note="Megatron's 2B benchmark model"),
    "llama3-8b": BenchConfig(
        _LLAMA + ["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32",
                  "--group-query-attention", "--num-query-groups", "8", "--ffn-hidden-size", "14336",
                  "--rotary-base", "500000"],
        vocab_size=128256, seq=8192, mbs=1, gbs=64, nproc=8, recompute="selective",
        note="needs 8 GPUs: pass --distributed-optimizer and a --tp that fits"),
    "bert-large": BenchConfig(
        ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16"],
        vocab_size=30522, seq=512, mbs=16, gbs=64, family="bert",
        note="BERT-large, binary head, padding-mask attention"),
    "tiny": BenchConfig(
        ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"],
        vocab_size=512, seq=128, mbs=2, gbs=4, note="CPU smoke test of the driver"),
    "bert-tiny": BenchConfig(
        ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"],
        vocab_size=512, seq=128, mbs=2, gbs=4, family="bert", note="CPU smoke test of the bert-large path"),
}
SINGLE_GPU_CONFIGS = [name for name, c in CONFIGS.items() if c.nproc == 1 and name != "tiny" and c.family == "gpt"]
_SCRIPTS = {"gpt": "pretrain_gpt.py", "bert": "pretrain_bert.py"}


def _tokenizer_flags(cfg: BenchConfig) -> List[str]:
    if cfg.family != "bert":
        return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(cfg.vocab_size)]
    # BERT's mock data needs [CLS]/[SEP]/[MASK]/[PAD]: a WordPiece vocabulary of the same size.
    path = Path(tempfile.gettempdir()) / f"bench_wordpiece_{cfg.vocab_size}.txt"
    if not path.exists():
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        path.write_text("\n".join(specials + [f"w{i}" for i in range(cfg.vocab_size - len(specials))]) + "\n")
    return ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(path)]

# ---------------------------------------------------------------------------------------------
# Command line of one run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    nproc: int
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    distributed_optimizer: bool = False
    recompute: str = "none"
    overlap: bool = False
    fsdp2: bool = False

    @property
    def dp(self) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if self.nproc % model_parallel:
            raise ValueError(
                f"--nproc {self.nproc} is not a multiple of --tp {self.tp} x --pp {self.pp} x --cp {self.cp}"
                f" = {model_parallel}: data parallelism takes the rest, so pick --nproc as a multiple"
            )
        return self.nproc // model_parallel

    def flags(self) -> List[str]:
        out = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
               "--context-parallel-size", str(self.cp)]
        if self.vpp:
            out += ["--num-virtual-stages-per-pipeline-rank", str(self.vpp)]
        if self.tp > 1:
            out += ["--sequence-parallel"]
        if self.distributed_optimizer:
            out += ["--use-distributed-optimizer"]
        if self.overlap:
            out += ["--overlap-grad-reduce", "--overlap-param-gather"]
        if self.fsdp2:
            # FSDP2 needs untied embeddings (as in Megatron-LM); the untied configs keep their shape.
            out += ["--use-torch-fsdp2", "--untie-embeddings-and-output-weights"]
        if self.recompute == "selective":
            out += ["--recompute-granularity", "selective"]
        elif self.recompute == "full":
            out += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
        return out


def pretrain_flags(cfg: BenchConfig, layout: Layout, seq: int, mbs: int, gbs: int, iters: int,
                   log_interval: int, cpu: bool, extra: Sequence[str]) -> List[str]:
    """The pretrain_gpt.py flags of one run; ``extra`` comes last so it overrides."""
    flags = list(cfg.model_flags) + [
        "--seq-length", str(seq), "--max-position-embeddings", str(seq),
        "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
        "--train-iters", str(iters), "--lr", "3e-4", "--lr-warmup-iters", "0",
        "--mock-data", *_tokenizer_flags(cfg),
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--log-interval", str(log_interval), "--log-throughput", "--eval-iters", "0",
    ]
    flags += ["--distributed-backend", "gloo", "--num-workers", "0"] if cpu else ["--bf16"]
    return flags + layout.flags() + list(extra)


def profile_flags(steps: Sequence[int], trace_dir: Path) -> List[str]:
    """pretrain_gpt.py flags that profile iterations ``steps`` = (first, last) with torch.profiler,
    writing the trace and the breakdown JSON to ``trace_dir``."""
    first, last = steps
    return ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(first),
            "--profile-step-end", str(last), "--tensorboard-dir", str(trace_dir)]


def launch_command(nproc: int, flags: Sequence[str], family: str = "gpt") -> List[str]:
    script = str(REPO / _SCRIPTS[family])
    if nproc == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            script, *flags]


def run_shape(flags: Sequence[str], world_size: int, family: str = "gpt"):
    """(FLOPs of one iteration, sequence length, global batch size) of the run these flags
    describe, by the project's own argument parsing: the FLOPs are what the log line divides
    by time, and --extra may have changed the shape."""
    sys.path.insert(0, str(REPO))
    from megatron.training.arguments import parse_and_validate
    from megatron.training.flops import bert_floating_point_operations, num_floating_point_operations
    from megatron.training.tokenizer import build_tokenizer, vocab_size_with_padding

    args = parse_and_validate(list(flags), world_size=world_size, rank=0)
    args.padded_vocab_size = vocab_size_with_padding(build_tokenizer(args).vocab_size, args)
    count = bert_floating_point_operations if family == "bert" else num_floating_point_operations
    return count(args, args.global_batch_size), args.seq_length, args.global_batch_size


# ---------------------------------------------------------------------------------------------
# Log parsing (formats: megatron/training/training_log.py)
# ---------------------------------------------------------------------------------------------

_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|")
_MS = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")
_TFLOPS = re.compile(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)")
_LOSS = re.compile(r"lm loss: ([0-9.Ee+-]+|nan|inf)")
_SKIPPED = re.compile(r"number of skipped iterations: +(\d+)")
_MEMORY = re.compile(
    r"\[Rank (\d+)\] \(after (\d+) iterations\) memory \(MB\) \| allocated: ([0-9.]+) \| "
    r"max allocated: ([0-9.]+) \| reserved: ([0-9.]+) \| max reserved: ([0-9.]+)")
_LOGGER_MESSAGE = re.compile(r"\] INFO [\w.]+: (.*)$")
_BACKEND_WORDS = re.compile(r"backend|fused|fusion|kernel|compile", re.IGNORECASE)
# The profiler's summary line and breakdown block (megatron/training/profiling.py).
_PROFILE = re.compile(r"\[Rank \d+\] profile( of iterations \d+-\d+:| \|)")


@dataclass
class IterationLine:
    iteration: int
    ms_per_iter: float
    tflops: Optional[float]
    loss: Optional[float]
    skipped: int = 0  # iterations of the line's interval whose optimizer step was skipped


def parse_iteration_line(line: str) -> Optional[IterationLine]:
    """The numbers of one Megatron iteration line, or None for any other line."""
    it, ms = _ITERATION.search(line), _MS.search(line)
    if not it or not ms:
        return None
    tflops, loss, skipped = _TFLOPS.search(line), _LOSS.search(line), _SKIPPED.search(line)
    return IterationLine(int(it.group(1)), float(ms.group(1)),
                         float(tflops.group(1)) if tflops else None, float(loss.group(1)) if loss else None,
                         int(skipped.group(1)) if skipped else 0)


@dataclass
class ParsedLog:
    lines: List[IterationLine] = field(default_factory=list)
    max_allocated_mb: Optional[float] = None
    max_reserved_mb: Optional[float] = None
    backends: List[str] = field(default_factory=list)
    profile: List[str] = field(default_factory=list)


def parse_log(text: str) -> ParsedLog:
    out = ParsedLog()
    for raw in text.splitlines():
        line = parse_iteration_line(raw)
        if line is not None:
            out.lines.append(line)
            continue
        mem = _MEMORY.search(raw)
        if mem:
            out.max_allocated_mb = max(out.max_allocated_mb or 0.0, float(mem.group(4)))
            out.max_reserved_mb = max(out.max_reserved_mb or 0.0, float(mem.group(6)))
            continue
        prof = _PROFILE.search(raw)
        if prof:
            out.profile.append(raw[prof.start():].rstrip())
            continue
        msg = _LOGGER_MESSAGE.search(raw)
        if msg and _BACKEND_WORDS.search(msg.group(1)) and msg.group(1) not in out.backends:
            out.backends.append(msg.group(1).strip())
    return out


def steady_state(lines: Sequence[IterationLine], warmup: int, exclude: Optional[Sequence[int]] = None):
    """(mean ms/iter, mean logged TFLOP/s, iterations measured) over the iterations after the
    first ``warmup``. A line reports the mean of the iterations since the previous line, so
    only lines whose whole interval lies past the warmup count, weighted by interval length.
    ``exclude`` = (first, last) drops, in the same way, every line whose interval contains one
    of those iterations (the profiled ones, which the profiler slows down)."""
    total_ms, total_iters, tflops_weighted, tflops_iters, previous = 0.0, 0, 0.0, 0, 0
    for line in lines:
        span = line.iteration - previous
        overlaps = exclude is not None and previous < exclude[1] and line.iteration >= exclude[0]
        if previous >= warmup and span > 0 and not overlaps:
            total_ms += line.ms_per_iter * span
            total_iters += span
            if line.tflops is not None:
                tflops_weighted += line.tflops * span
                tflops_iters += span
        previous = line.iteration
    if total_iters == 0:
        return None, None, 0
    return total_ms / total_iters, (tflops_weighted / tflops_iters if tflops_iters else None), total_iters


# ---------------------------------------------------------------------------------------------
# One benchmark row
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    layout: str
    seq: int
    mbs: int
    gbs: int
    world_size: int
    status: str = "ok"
    iters_measured: int = 0
    ms_per_iter: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tokens_per_s_per_gpu: Optional[float] = None
    tflops_per_gpu: Optional[float] = None
    tflops_logged: Optional[float] = None
    mfu: Optional[float] = None
    max_allocated_gb: Optional[float] = None
    max_reserved_gb: Optional[float] = None
    backends: str = "default"
    final_loss: Optional[float] = None
    # Measured iterations that skipped the optimizer step (non-finite gradients): they are
    # cheaper than a real step, so a non-zero count flatters the row.
    skipped_iters: int = 0
    profile: List[str] = field(default_factory=list)
    log_file: str = ""
    command: List[str] = field(default_factory=list)


def describe_layout(layout: Layout) -> str:
    parts = [f"tp{layout.tp}", f"pp{layout.pp}"] + ([f"vpp{layout.vpp}"] if layout.vpp else [])
    parts += [f"cp{layout.cp}", f"dp{layout.dp}"]
    if layout.distributed_optimizer:
        parts.append("distopt")
    if layout.overlap:
        parts.append("overlap")
    if layout.fsdp2:
        parts.append("fsdp2")
    if layout.recompute != "none":
        parts.append(f"rc-{layout.recompute}")
    return " ".join(parts)


def fill_row(row: Row, log_text: str, flops: float, warmup: int, exclude: Optional[Sequence[int]] = None) -> Row:
    parsed = parse_log(log_text)
    ms, tflops_logged, measured = steady_state(parsed.lines, warmup, exclude)
    row.profile = parsed.profile
    if parsed.lines:
        row.final_loss = parsed.lines[-1].loss
    previous = 0
    for line in parsed.lines:  # the same intervals steady_state averages
        if previous >= warmup:
            row.skipped_iters += line.skipped
        previous = line.iteration
    if parsed.backends:
        row.backends = "; ".join(parsed.backends)
    if parsed.max_allocated_mb is not None:
        row.max_allocated_gb = parsed.max_allocated_mb / 1024.0
        row.max_reserved_gb = parsed.max_reserved_mb / 1024.0
    if ms is None or ms <= 0:
        outside = f" outside the profiled iterations {exclude[0]}-{exclude[1]}" if exclude else ""
        row.status = row.status if row.status != "ok" else f"no iteration lines past warmup {warmup}{outside}"
        return row
    seconds = ms / 1000.0
    row.iters_measured, row.ms_per_iter, row.tflops_logged = measured, ms, tflops_logged
    row.tokens_per_s = row.gbs * row.seq / seconds
    row.tokens_per_s_per_gpu = row.tokens_per_s / row.world_size
    row.tflops_per_gpu = flops / (seconds * 1e12 * row.world_size)
    row.mfu = row.tflops_per_gpu / PEAK_TFLOPS
    return row


def run_one(name: str, opts, fp8: Optional[str] = None) -> Row:
    """Launch one configuration and measure it; a layout the flags reject becomes the row's
    status (the other configurations still run). ``fp8``: an FP8 recipe to train with."""
    cfg = CONFIGS[name]
    nproc = 1 if opts.cpu else (opts.nproc or cfg.nproc)
    recompute = opts.recompute or cfg.recompute
    layout = Layout(nproc, opts.tp, opts.pp, opts.vpp, opts.cp, opts.distributed_optimizer, recompute, opts.overlap,
                    opts.fsdp2)
    seq, mbs = opts.seq or cfg.seq, opts.mbs or cfg.mbs
    log_path = Path(opts.log_dir) / f"{name}{'-fp8-' + fp8 if fp8 else ''}.log"
    try:
        per_step = mbs * layout.dp  # a global batch is a whole number of micro-batches per DP rank
        gbs = opts.gbs or -(-cfg.gbs // per_step) * per_step
        extra = shlex.split(opts.extra)
        if fp8:  # before --extra, so raw flags still win
            extra = ["--fp8-format", "hybrid", "--fp8-recipe", fp8] + (["--fp8-emulation"] if opts.cpu else []) + extra
        if opts.profile_steps:  # before --extra, so raw flags still win
            extra = profile_flags(opts.profile_steps, Path(opts.log_dir) / f"profile_{name}") + extra
        flags = pretrain_flags(cfg, layout, seq, mbs, gbs, opts.iters, opts.log_interval, opts.cpu, extra)
        flops, seq, gbs = run_shape(flags, nproc, cfg.family)
        cmd = launch_command(nproc, flags, cfg.family)
        row = Row(name + (f" fp8-{fp8}" if fp8 else ""), describe_layout(layout), seq, mbs, gbs, nproc,
                  log_file=str(log_path), command=cmd)
    except ValueError as err:
        print(f"== {name}: skipped: {err}", file=sys.stderr, flush=True)
        return Row(name, f"tp{layout.tp} pp{layout.pp} cp{layout.cp} nproc{nproc}", seq, mbs, opts.gbs or cfg.gbs,
                   nproc, status=f"invalid: {err}")
    print(f"== {name}: {row.layout}, seq {seq}, mbs {mbs}, gbs {gbs}  (log: {log_path})", flush=True)
    rc, text = _stream(cmd, log_path, opts.quiet, opts.timeout)
    if rc == TIMED_OUT:
        row.status = f"stopped after --timeout {opts.timeout:g} s: see {log_path}"
    elif rc != 0:
        row.status = f"exit code {rc}: see {log_path}"
        print("\n".join(text.splitlines()[-15:]), file=sys.stderr)
    # The iteration after the window is out too: it carries the writing of the trace.
    exclude = None if opts.profile_steps is None else (opts.profile_steps[0], opts.profile_steps[1] + 1)
    return fill_row(row, text, flops, opts.warmup, exclude)


TIMED_OUT = "timed out"


def _stream(cmd: Sequence[str], log_path: Path, quiet: bool, timeout: Optional[float] = None):
    """Run ``cmd`` from the repository root, saving its output and echoing iteration lines.
    Returns (exit code, output); the code is TIMED_OUT when the run outlived ``timeout``
    seconds, and then its whole process group (torchrun and every worker) was killed, so
    the GPUs are free for the next run and the lines logged so far are still measured."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    chunks = []
    with open(log_path, "w") as log, subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True) as proc:
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL)) if timeout else None
        if timer is not None:
            timer.start()
        try:
            for raw in proc.stdout:
                log.write(raw)
                chunks.append(raw)
                if not quiet and (_ITERATION.search(raw) or _MEMORY.search(raw) or "Error" in raw):
                    print("   " + raw.rstrip()[:220], flush=True)
        finally:
            if timer is not None:
                timer.cancel()
    # A killed group ends with -SIGKILL; a run that finished just before the timer is not "timed out".
    timed_out = timer is not None and not timer.is_alive() and proc.returncode == -signal.SIGKILL
    return (TIMED_OUT if timed_out else proc.returncode), "".join(chunks)


# ---------------------------------------------------------------------------------------------
# Environment and report
# ---------------------------------------------------------------------------------------------


def environment() -> Dict[str, str]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_count": str(torch.cuda.device_count() if cuda else 0),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version() if cuda else None),
        "sdpa_kernels_enabled": _sdpa_kernels_enabled(torch) if cuda else "n/a",
    }


def _sdpa_kernels_enabled(torch) -> str:
    """The SDPA kernels torch may pick from (its defaults; the run itself logs no finer choice)."""
    checks = {"cudnn": "cudnn_sdp_enabled", "flash": "flash_sdp_enabled",
              "mem_efficient": "mem_efficient_sdp_enabled", "math": "math_sdp_enabled"}
    return ",".join(name for name, fn in checks.items() if getattr(torch.backends.cuda, fn, lambda: False)())


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_small(value, scale: float = 1.0, suffix: str = "") -> str:
    """One decimal for GPU-sized numbers, three significant digits for CPU-sized ones."""
    if value is None:
        return "-"
    value *= scale
    return (f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.3g}") + suffix


def table(rows: Sequence[Row]) -> str:
    header = ["config", "layout", "seq", "mbs", "gbs", "ms/iter", "tok/s", "tok/s/GPU", "TFLOP/s/GPU",
              "MFU", "max alloc GB", "skipped", "status"]
    body = [[r.config, r.layout, str(r.seq), str(r.mbs), str(r.gbs), _fmt(r.ms_per_iter, ".1f"),
             _fmt(r.tokens_per_s, ",.0f"), _fmt(r.tokens_per_s_per_gpu, ",.0f"), _fmt_small(r.tflops_per_gpu),
             _fmt_small(r.mfu, 100.0, "%"), _fmt(r.max_allocated_gb, ".1f"), str(r.skipped_iters), r.status]
            for r in rows]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header] + body)


def parse_cli(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all",
                   help=f"comma-separated names from {', '.join(CONFIGS)}; 'all' (the default) = "
                        f"{', '.join(SINGLE_GPU_CONFIGS)}")
    p.add_argument("--nproc", type=int, default=None, help="processes (GPUs); default: the config's (1, llama3-8b 8)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size, default 1 (adds --sequence-parallel when > 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size, default 1")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    p.add_argument("--cp", type=int, default=1, help="context parallel size, default 1; data parallel = nproc / (tp*pp*cp)")
    p.add_argument("--distributed-optimizer", action="store_true", help="shard optimizer state over data parallel")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default=None,
                   help="activation recompute; default: the config's (selective for the llamas)")
    p.add_argument("--overlap", action="store_true", help="add --overlap-grad-reduce --overlap-param-gather")
    p.add_argument("--fsdp2", action="store_true",
                   help="shard weights, grads and optimizer state with --use-torch-fsdp2 (adds "
                        "--untie-embeddings-and-output-weights); time it next to a --distributed-optimizer --overlap "
                        "row of an untied config (gpt-1.7b, llama-1.6b, llama3-8b)")
    p.add_argument("--seq", type=int, default=None, help="sequence length; default: the config's")
    p.add_argument("--mbs", type=int, default=None, help="micro batch size; default: the config's")
    p.add_argument("--gbs", type=int, default=None, help="global batch size; default: the config's")
    p.add_argument("--iters", type=int, default=None, help="--train-iters (default 30; --cpu 6)")
    p.add_argument("--warmup", type=int, default=None, help="iterations left out of the averages (default 10; --cpu 2)")
    p.add_argument("--log-interval", type=int, default=None, help="--log-interval (default 5; --cpu 1)")
    p.add_argument("--extra", default="", help='raw pretrain_gpt.py flags appended last, so they win; write --extra="--flag value"')
    p.add_argument("--fp8", choices=["delayed", "tensorwise"], default=None,
                   help="also run each config with --fp8-format hybrid --fp8-recipe RECIPE; prints FP8/bf16 speedups")
    p.add_argument("--cpu", action="store_true", help="one process on CPU over gloo, fp32 (only sensible for tiny)")
    p.add_argument("--json", default=None, help="write the environment and rows to this JSON file")
    p.add_argument("--log-dir", default=None, help="where each run's full log goes (default: a temporary directory)")
    p.add_argument("--quiet", action="store_true", help="do not echo the runs' iteration lines")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a run (its whole process group) after this many seconds; the iterations it "
                        "logged past the warmup are still measured and its status says it was stopped")
    p.add_argument("--profile", action="store_true",
                   help="profile iterations warmup+2 and warmup+3 with torch.profiler, print where the device "
                        "time goes, and leave them and the next one (trace writing) out of the averages; trace in "
                        "<log dir>/profile_<config>")
    p.add_argument("--profile-steps", default=None, metavar="S:E",
                   help="profile iterations S to E (1-based, inclusive) instead of warmup+2 to warmup+3; "
                        "implies --profile")
    opts = p.parse_args(argv)
    small = opts.cpu
    opts.iters = opts.iters or (6 if small else 30)
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if small else 10)
    opts.log_interval = opts.log_interval or (1 if small else 5)
    if opts.warmup >= opts.iters:
        p.error(f"--warmup {opts.warmup} leaves nothing to measure out of --iters {opts.iters}; lower --warmup")
    opts.profile_steps = _profile_steps(p, opts)
    if opts.fsdp2 and (opts.distributed_optimizer or opts.overlap):
        p.error("--fsdp2 shards the optimizer state itself and always overlaps its reduce-scatters: "
                "drop --distributed-optimizer and --overlap (run those as a separate row)")
    names = SINGLE_GPU_CONFIGS if opts.configs == "all" else [n.strip() for n in opts.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)} or 'all'")
    opts.names = names
    opts.log_dir = opts.log_dir or tempfile.mkdtemp(prefix="pretrain-bench-")
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)
    return opts


def _profile_steps(p: argparse.ArgumentParser, opts) -> Optional[tuple]:
    """(first, last) profiled iteration, or None without --profile / --profile-steps."""
    if opts.profile_steps is None:
        if not opts.profile:
            return None
        first, last = opts.warmup + 2, opts.warmup + 3
        if last > opts.iters:
            p.error(f"--profile profiles iterations {first}-{last} (--warmup {opts.warmup} + 2 and + 3), past "
                    f"--iters {opts.iters}; raise --iters or pick them with --profile-steps S:E")
        return first, last
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", opts.profile_steps)
    if not match:
        p.error(f"--profile-steps {opts.profile_steps!r}: expected S:E, two iteration numbers such as 12:13")
    first, last = int(match.group(1)), int(match.group(2))
    if not 1 <= first <= last <= opts.iters:
        p.error(f"--profile-steps {opts.profile_steps}: need 1 <= S <= E <= --iters {opts.iters}")
    return first, last


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_cli(argv)
    env = environment()
    rows = [run_one(name, opts, fp8) for name in opts.names for fp8 in [None] + ([opts.fp8] if opts.fp8 else [])]
    print()
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    for r in rows:
        print(f"{r.config}: backends: {r.backends}")
    print(table(rows))
    if opts.fp8:
        by_name = {r.config: r for r in rows}
        for name in opts.names:
            base, fast = by_name.get(name), by_name.get(f"{name} fp8-{opts.fp8}")
            if base and fast and base.tokens_per_s and fast.tokens_per_s:
                print(f"{name}: FP8 ({opts.fp8}) / bf16 tokens/s = {fast.tokens_per_s / base.tokens_per_s:.2f}x")
    if opts.profile_steps:
        first, last = opts.profile_steps
        for r in rows:
            print(f"\n== {r.config}: profile of iterations {first}-{last} (left out of the table; trace and "
                  f"JSON in {Path(opts.log_dir) / f'profile_{r.config}'})")
            print("\n".join(r.profile) if r.profile else "   no profile lines in the log: see " + (r.log_file or "-"))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"environment": env, "peak_tflops": PEAK_TFLOPS,
                                               "rows": [asdict(r) for r in rows]}, indent=2))
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
