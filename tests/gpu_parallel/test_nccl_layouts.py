"""Every parallel layout trains like one GPU, over NCCL.

A tiny LLaMA-style GPT (4 layers, hidden 128, 8 heads in 4 query groups, SwiGLU FFN 352,
RMSNorm, RoPE, no biases, untied embeddings, seq 128, vocab 1024, mock data) trains in
fp32 for 10 iterations (micro-batch 2, global batch 16, lr 1e-3, no dropout) on one GPU and
on each layout; all 10 losses and grad norms must agree. The reference runs once per module
(one dense and one MoE reference). The runs take the reference-path flags
(--no-*-fusion, --no-persist-layer-norm): no compile time here, the fused kernels have
their own tests. --use-cpu-initialization makes the initial weights independent of the
layout (each layer draws from the seed and its global layer number), so every run starts
from the same weights and reads the same samples.

Tolerance: relative 1e-4 on the loss, 1e-3 on the grad norm (a starting point, looser
than the 2e-5 of the CPU parity tests in tests/training, which this file mirrors on GPUs).
The runs are fp32 with TF32 off (PyTorch's default for matmuls; NVIDIA_TF32_OVERRIDE=0 so
no environment turns it on), so one step of a layout differs from one GPU only by
reordered sums: cuBLAS picks other (split-K) kernels for the sharded GEMM shapes, NCCL
sums ring/tree partials in its own order, attention and embedding backwards accumulate
with atomics. That is ~1e-7..1e-6 relative per step; Adam then divides each update by the
root of its second moment, so elements with tiny gradients carry those last bits into
O(lr) weight changes, and the drift grows over the 10 steps. 1e-4 leaves room for that and
is still far below a real fault: the CPU parity tests' planted bugs (a dropped gradient
reduce-scatter, a skipped micro-batch backward, a missing tensor-parallel all-reduce) move
the loss by 1e-3 or more within 3 steps. Grad norms are logged with 3 decimals, so their
bound is at least one printed step (0.001). test_other_seed_fails_the_tolerance shows the
bounds can fail: another --seed differs from the reference beyond them at iteration 1.

Layouts needing 2 GPUs skip below 2 visible GPUs, those needing 4 below 4.

Harness check without a GPU: MEGATRON_GPU_TESTS_ON_CPU=1 runs the same launches over gloo
on CPU (see launch.py); call ``check_layout(name, reference_run(...), iters=...)`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from tests.gpu_parallel.launch import REFERENCE_PATH, grad_norms, llama_flags, losses, run_pretrain

ITERS = 10
LOSS_RTOL = 1e-4
GRAD_NORM_RTOL = 1e-3
GRAD_NORM_PRINT_STEP = 1e-3  # the log prints grad norms with 3 decimals
OTHER_SEED = "1235"  # the default --seed is 1234

MODEL = llama_flags(hidden=128, ffn=352, seq=128, vocab=1024, mbs=2, gbs=16) + ["--lr", "1e-3"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"]
FP32_ENV = {"NVIDIA_TF32_OVERRIDE": "0"}

TP2 = ["--tensor-model-parallel-size", "2"]
SP = ["--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]
CP2 = ["--context-parallel-size", "2"]
DISTOPT = ["--use-distributed-optimizer"]
# ~1M parameters in several buckets, so the overlapped reductions and gathers interleave.
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "200000"]

# name: (GPUs, flags, reference). Data parallelism is what is left of the world size.
LAYOUTS: dict[str, tuple] = {
    "tp2": (2, TP2, "dense"),
    "tp2-sp": (2, TP2 + SP, "dense"),
    "tp2-sp-comm-overlap": (2, TP2 + SP + ["--tp-comm-overlap"], "dense"),
    "pp2-1f1b": (2, PP2, "dense"),
    "pp2-interleaved-vpp2": (2, PP2 + ["--num-virtual-stages-per-pipeline-rank", "2"], "dense"),
    "dp2": (2, [], "dense"),
    "dp2-distopt": (2, DISTOPT, "dense"),
    "dp2-distopt-overlap": (2, DISTOPT + OVERLAP, "dense"),
    "cp2-p2p": (2, CP2, "dense"),
    "cp2-a2a": (2, CP2 + ["--cp-comm-type", "a2a"], "dense"),
    "moe-ep2-allgather": (2, ["--expert-model-parallel-size", "2"], "moe"),
    "moe-ep2-alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], "moe"),
    "tp2xdp2-distopt": (4, TP2 + DISTOPT, "dense"),
    "tp2xpp2": (4, TP2 + PP2, "dense"),
    "pp2xdp2": (4, PP2, "dense"),
    "tp2-spxcp2": (4, TP2 + SP + CP2, "dense"),
    "pp2-interleaved-vpp2xdp2-distopt-overlap": (
        4, PP2 + ["--num-virtual-stages-per-pipeline-rank", "2"] + DISTOPT + OVERLAP, "dense"),
    # Two distributed-optimizer instances: of one rank each (the shard is all-reduced across
    # them), and of two ranks with overlap (reduce-scatter and all-reduce chained on a side stream).
    "dp2-distopt-2instances": (2, DISTOPT + ["--num-distributed-optimizer-instances", "2"], "dense"),
    "dp4-distopt-2instances-overlap": (
        4, DISTOPT + ["--num-distributed-optimizer-instances", "2"] + OVERLAP, "dense"),
    # FSDP2 (the model is untied, as FSDP2 needs): sharded over dp, then under tp.
    "dp2-fsdp2": (2, ["--use-torch-fsdp2"], "dense"),
    "tp2-spxdp2-fsdp2": (4, TP2 + SP + ["--use-torch-fsdp2"], "dense"),
}


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _needs(n: int):
    return pytest.mark.skipif(_gpus() < n, reason=f"needs {n} GPUs, {_gpus()} visible")


def _run(nproc: int, kind: str, extra: Sequence[str], iters: int) -> dict:
    """A run of the dense model or (``kind="moe"``) of its MoE variant on ``nproc`` GPUs."""
    model = MODEL + (MOE if kind == "moe" else [])
    log = run_pretrain(nproc, model + REFERENCE_PATH + ["--train-iters", str(iters)] + list(extra), env=FP32_ENV)
    return {"losses": losses(log), "grad_norms": grad_norms(log)}


def reference_run(kind: str = "dense", iters: int = ITERS) -> dict:
    """The one-GPU run of the dense model or (``kind="moe"``) of its MoE variant."""
    return _run(1, kind, [], iters)


def _grad_norm_bound(ref: float) -> float:
    # + 1e-9: two printed values one step apart differ by 0.001 plus float error
    return max(GRAD_NORM_RTOL * abs(ref), GRAD_NORM_PRINT_STEP) + 1e-9


def compare(name: str, got: dict, ref: dict, iters: int = ITERS) -> None:
    """Assert ``got`` matches ``ref`` at every iteration; messages name layout, iteration, values."""
    for key in ("losses", "grad_norms"):
        assert len(got[key]) == len(ref[key]) == iters, (
            f"{name}: expected {iters} logged {key} in both runs, got {len(got[key])} (layout) "
            f"and {len(ref[key])} (one GPU)")
    for i, (x, y) in enumerate(zip(got["losses"], ref["losses"]), start=1):
        assert abs(x - y) <= LOSS_RTOL * abs(y), (
            f"{name}: iteration {i} loss {x} vs one-GPU {y} (relative diff {abs(x - y) / abs(y):.2e} > {LOSS_RTOL})")
    for i, (x, y) in enumerate(zip(got["grad_norms"], ref["grad_norms"]), start=1):
        bound = _grad_norm_bound(y)
        assert abs(x - y) <= bound, (
            f"{name}: iteration {i} grad norm {x} vs one-GPU {y} (diff {abs(x - y):.4f} > {bound:.4f})")


def check_layout(name: str, reference: dict, iters: int = ITERS) -> dict:
    """Run layout ``name`` of LAYOUTS and compare it with ``reference``; returns its run."""
    nproc, extra, kind = LAYOUTS[name]
    got = _run(nproc, kind, extra, iters)
    compare(name, got, reference, iters)
    return got


class _References(dict):
    """The one-GPU reference runs, each made on first use."""

    def __missing__(self, kind: str) -> dict:
        self[kind] = reference_run(kind)
        return self[kind]


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return _References()


def _params(min_gpus: int) -> list:
    return [pytest.param(name, id=name, marks=_needs(nproc)) for name, (nproc, _, _) in LAYOUTS.items()
            if nproc == min_gpus]


@pytest.mark.gpu
@pytest.mark.parametrize("name", _params(2))
def test_two_gpu_layout_matches_one_gpu(references, name):
    """Each 2-GPU layout (TP with/without SP and comm overlap, 1F1B and interleaved PP, DP with
    and without the distributed optimizer and overlapped reductions, CP p2p and a2a, MoE with
    EP) gives the one-GPU losses and grad norms over 10 fp32 iterations."""
    check_layout(name, references[LAYOUTS[name][2]])


@pytest.mark.gpu
@pytest.mark.parametrize("name", _params(4))
def test_four_gpu_layout_matches_one_gpu(references, name):
    """Each combined 4-GPU layout (TP x DP with the distributed optimizer, TP x PP, PP x DP,
    TP-SP x CP, interleaved PP with overlapped p2p x DP with the distributed optimizer and
    overlapped grad reduce / param gather) gives the one-GPU losses and grad norms over 10
    fp32 iterations."""
    check_layout(name, references[LAYOUTS[name][2]])


def check_other_seed_fails(reference: dict) -> None:
    """Another --seed is outside both bounds at iteration 1, and compare() says so."""
    other = _run(1, "dense", ["--seed", OTHER_SEED], iters=1)
    x, y = other["losses"][0], reference["losses"][0]
    assert abs(x - y) > LOSS_RTOL * abs(y), f"--seed {OTHER_SEED}: iteration 1 loss {x} vs {y} within {LOSS_RTOL}"
    gx, gy = other["grad_norms"][0], reference["grad_norms"][0]
    assert abs(gx - gy) > _grad_norm_bound(gy), f"--seed {OTHER_SEED}: iteration 1 grad norm {gx} vs {gy} within bound"
    first = {key: values[:1] for key, values in reference.items()}
    with pytest.raises(AssertionError, match="iteration 1 loss"):
        compare(f"seed {OTHER_SEED}", other, first, iters=1)


@pytest.mark.gpu
def test_other_seed_fails_the_tolerance(references):
    """The tolerance can fail: one GPU with another seed (other initial weights) differs from
    the reference at the very first iteration by more than the loss and grad-norm bounds."""
    check_other_seed_fails(references["dense"])


def test_compare_names_layout_iteration_and_values():
    """compare() (no GPU needed) accepts drift inside the bounds and rejects a loss or a grad
    norm just outside them, naming the layout, the iteration and both values."""
    ref = {"losses": [6.9, 6.5, 6.1], "grad_norms": [0.9, 1.5, 2.0]}
    inside = {"losses": [6.9 * (1 + 0.9 * LOSS_RTOL), 6.5, 6.1], "grad_norms": [0.901, 1.5, 2.0015]}
    compare("tp2", inside, ref, iters=3)
    bad_loss = {"losses": [6.9, 6.5, 6.1 * (1 + 1.5 * LOSS_RTOL)], "grad_norms": ref["grad_norms"]}
    with pytest.raises(AssertionError, match=r"tp2: iteration 3 loss 6\.\d+ vs one-GPU 6\.1 "):
        compare("tp2", bad_loss, ref, iters=3)
    bad_norm = {"losses": ref["losses"], "grad_norms": [0.9, 1.503, 2.0]}
    with pytest.raises(AssertionError, match=r"pp2: iteration 2 grad norm 1\.503 vs one-GPU 1\.5 "):
        compare("pp2", bad_norm, ref, iters=3)
    with pytest.raises(AssertionError, match="expected 3 logged losses"):
        compare("dp2", {"losses": [6.9, 6.5], "grad_norms": [0.9, 1.5]}, ref, iters=3)


if __name__ == "__main__":
    # Harness check (CPU mode with MEGATRON_GPU_TESTS_ON_CPU=1):
    #   python -m tests.gpu_parallel.test_nccl_layouts ITERS LAYOUT [LAYOUT ...] [other-seed]
    import sys
    import time

    n_iters = int(sys.argv[1])
    names = sys.argv[2:] or ["tp2"]
    refs: dict[str, dict] = {}
    for layout in names:
        if layout == "other-seed":
            start = time.time()
            check_other_seed_fails(refs.get("dense") or refs.setdefault("dense", reference_run("dense", n_iters)))
            print(f"other-seed control: {time.time() - start:.1f} s: fails as it should")
            continue
        kind = LAYOUTS[layout][2]
        if kind not in refs:
            start = time.time()
            refs[kind] = reference_run(kind, n_iters)
            print(f"reference {kind}: {time.time() - start:.1f} s, losses {refs[kind]['losses']}")
        start = time.time()
        run = check_layout(layout, refs[kind], n_iters)
        print(f"{layout}: {time.time() - start:.1f} s, losses {run['losses']}, grad norms {run['grad_norms']}: ok")
