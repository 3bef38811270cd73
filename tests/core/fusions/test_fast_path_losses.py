"""The fast path trains like the reference path: 50 bf16 steps on one GPU.

A ~20M-parameter LLaMA-style GPT (4 layers, hidden 512, 8 heads in 4 query groups, SwiGLU
FFN 1408, RMSNorm, RoPE, no biases, untied embeddings, seq 512, vocab 8192, mock data,
micro-batch 4, global batch 16, no dropout, --bf16) trains for 50 steps three times from
the same weights (--use-cpu-initialization) on the same samples:

- fast: the defaults on a GPU (fused SwiGLU, bias-dropout-add, RoPE and norms, compiled);
- reference: the unfused paths (--no-bias-swiglu-fusion --no-bias-dropout-fusion
  --no-rope-fusion --no-persist-layer-norm --no-bias-gelu-fusion);
- fast + --cross-entropy-loss-fusion.

The kernel-level tests in this folder prove each fused op equals its reference op to
bf16 precision on one call; these prove the differences stay that small through training
(forward, backward, optimizer, 50 times). In bf16 two runs that round differently drift
apart step by step, so the bounds are statistical, not bitwise: every step's loss within
2% relative, the mean over the last 10 steps within 0.5% (the per-step noise averages out;
a systematic error, such as a fused backward off by a factor or a wrong RoPE, biases the
whole tail), and each curve falls by at least 2 nats from its first step (the first loss is
about ln 8192 = 9.0; the mock documents count upwards, so a working model learns them
quickly), which rules out two runs agreeing because neither learns.
"""

from __future__ import annotations

import pytest

from tests.gpu_parallel.launch import REFERENCE_PATH, llama_flags, losses, run_pretrain

STEPS = 50
STEP_RTOL = 0.02
TAIL = 10
TAIL_RTOL = 0.005
MIN_FALL_NATS = 2.0
TIMEOUT_S = 600  # the fast path compiles its fused regions on the first step

MODEL = llama_flags(hidden=512, ffn=1408, seq=512, vocab=8192, mbs=4, gbs=16) + [
    "--train-iters", str(STEPS), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "5", "--bf16",
]
VARIANTS = {
    "fast": [],
    "reference": REFERENCE_PATH,
    "fast+cross-entropy-fusion": ["--cross-entropy-loss-fusion"],
}


class _Runs(dict):
    """Loss curves of VARIANTS, each trained on first use; logs kept under ``log_dir``."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir

    def __missing__(self, name: str) -> list[float]:
        log_path = self.log_dir / f"{name}.log"
        log = run_pretrain(1, MODEL + VARIANTS[name], log_path=str(log_path), timeout=TIMEOUT_S)
        curve = losses(log)
        assert len(curve) == STEPS, f"{name}: {len(curve)} losses logged, expected {STEPS} (log: {log_path})"
        self[name] = curve
        return curve


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[float]]:
    return _Runs(tmp_path_factory.mktemp("fast_path_logs"))


def check_tracks(name: str, got: list[float], ref_name: str, ref: list[float]) -> None:
    """Assert the curve ``got`` tracks ``ref`` (per step, over the tail) and both learn."""
    for label, curve in ((name, got), (ref_name, ref)):
        tail = sum(curve[-TAIL:]) / TAIL
        assert curve[0] - tail >= MIN_FALL_NATS, (
            f"{label}: loss fell only from {curve[0]:.4f} to a last-{TAIL} mean of {tail:.4f} over {STEPS} steps "
            f"(expected a fall of at least {MIN_FALL_NATS} nats)")
    for step, (x, y) in enumerate(zip(got, ref), start=1):
        assert abs(x - y) <= STEP_RTOL * abs(y), (
            f"step {step}: {name} loss {x} vs {ref_name} {y} (relative diff {abs(x - y) / abs(y):.4f} > {STEP_RTOL})")
    got_tail, ref_tail = sum(got[-TAIL:]) / TAIL, sum(ref[-TAIL:]) / TAIL
    assert abs(got_tail - ref_tail) <= TAIL_RTOL * abs(ref_tail), (
        f"mean loss of the last {TAIL} steps: {name} {got_tail:.5f} vs {ref_name} {ref_tail:.5f} "
        f"(relative diff {abs(got_tail - ref_tail) / abs(ref_tail):.4f} > {TAIL_RTOL})")


@pytest.mark.gpu
def test_fast_path_tracks_reference_path(runs):
    """The default GPU path (fused SwiGLU, bias-dropout-add, RoPE, norms) trains like the
    unfused reference path over 50 bf16 steps, and both learn."""
    check_tracks("fast", runs["fast"], "reference", runs["reference"])


@pytest.mark.gpu
def test_cross_entropy_fusion_tracks_unfused(runs):
    """--cross-entropy-loss-fusion trains like the unfused cross entropy (both on the fast
    path) over 50 bf16 steps, and both learn."""
    check_tracks("fast+cross-entropy-fusion", runs["fast+cross-entropy-fusion"], "fast", runs["fast"])


def test_check_tracks_catches_a_biased_curve():
    """The bounds can fail: a curve 1% above the reference everywhere passes every step but
    fails the tail mean; one 3% off at a single step fails that step; a flat curve fails the
    learning check."""
    ref = [9.0 - 6.0 * i / (STEPS - 1) for i in range(STEPS)]
    check_tracks("same", list(ref), "ref", ref)
    with pytest.raises(AssertionError, match="mean loss of the last"):
        check_tracks("biased", [x * 1.01 for x in ref], "ref", ref)
    spiked = list(ref)
    spiked[20] *= 1.03
    with pytest.raises(AssertionError, match="step 21"):
        check_tracks("spiked", spiked, "ref", ref)
    with pytest.raises(AssertionError, match="fell only"):
        check_tracks("flat", [9.0] * STEPS, "ref", ref)
