"""A tiny MoE GPT (4 experts, top-2, aux and z losses) trains to the same losses on every
expert-parallel layout as on one process, with and without token dropping.

Tolerance: as in test_gpt_parity, the parallel runs do the same float32 math with sums
in another order (all-to-all / reduce-scatter of expert outputs, data-parallel gradient
averaging), ~1e-7 relative per step, carried by Adam over the steps; 2e-5 relative is
well above that and far below a routing error (a misrouted token changes the first
loss by ~1e-3; see tests/core/transformer/moe for the planted permutation bug).

Clipping stays on (--clip-grad 1.0): the global grad norm sums dense params over the
model-parallel group and expert params over the expert model-parallel group, so it and
the clipped steps must equal one process's too.
"""

import re

import pytest

from tests.training.gpt_runs import grad_norms, losses, run_gpt

RTOL = 2e-5
ITERS = 3
MOE = [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01",
    "--moe-z-loss-coeff", "0.001", "--disable-bias-linear", "--swiglu",
]
DROP = ["--moe-expert-capacity-factor", "1.0"]
BALANCING = re.compile(r"load_balancing_loss: ([0-9.E+-]+) \| z_loss: ([0-9.E+-]+)")


def _run(world, extra):
    return run_gpt(world, MOE + extra, iters=ITERS)


@pytest.fixture(scope="module")
def references():
    return {"dropless": _run(1, []), "drop": _run(1, DROP)}


def _close(log, reference):
    got, ref = losses(log), losses(reference)
    assert len(got) == len(ref) == ITERS, (got, ref)
    for i, (x, y) in enumerate(zip(got, ref)):
        assert abs(x - y) <= RTOL * abs(y), f"iteration {i + 1}: {x} vs {y}"
    got_norm, ref_norm = grad_norms(log), grad_norms(reference)
    assert len(got_norm) == ITERS and got_norm == pytest.approx(ref_norm, rel=1e-4), (got_norm, ref_norm)
    got_bal, ref_bal = BALANCING.findall(log), BALANCING.findall(reference)
    assert len(got_bal) == len(ref_bal) == ITERS
    for g, r in zip(got_bal, ref_bal):
        for x, y in zip(map(float, g), map(float, r)):
            assert abs(x - y) <= 1e-4 * abs(y), (got_bal, ref_bal)


def test_reference_logs_balancing_losses_and_drops_change_the_run(references):
    dropless = references["dropless"]
    assert "load_balancing_loss:" in dropless and "z_loss:" in dropless
    # A uniform router gives a balancing loss near 1 (E * sum f_i P_i with f = P = 1/E).
    assert 0.9 < float(BALANCING.findall(dropless)[0][0]) < 1.5
    assert losses(dropless) != losses(references["drop"])


@pytest.mark.parametrize(
    "world, extra, reference",
    [
        (4, ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"] + DROP, "drop"),
        (4, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], "dropless"),
        (4, ["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
             "--moe-token-dispatcher-type", "alltoall"] + DROP, "drop"),
        (4, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
             "--use-distributed-optimizer"], "dropless"),
    ],
    ids=["ep2xtp2-allgather-drop", "ep2xdp2-alltoall", "ep2xpp2-alltoall-drop", "ep2xdp2-distopt-alltoall"],
)
def test_expert_parallel_layout_matches_one_process(references, world, extra, reference):
    _close(_run(world, extra), references[reference])
