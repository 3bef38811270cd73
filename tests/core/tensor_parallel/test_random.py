"""The tensor-parallel RNG tracker and activation recompute.

RNG streams are compared bit for bit with generators seeded by hand (Megatron's offsets);
recompute must reproduce the forward exactly (same ops, same dropout masks), so gradients
are compared with torch.equal.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    CudaRNGStatesTracker,
    checkpoint,
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
)
from tests.multirank import run_on_ranks

SEED = 1234
# the tracker follows the default generator of this device, so recompute runs there too
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _draw(n=8):
    return torch.rand(n, device=DEVICE).cpu()


def _seeded_draws(seed, count, n=8):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.rand(n, generator=gen, device=DEVICE).cpu() for _ in range(count)]


def test_fork_uses_megatron_seeds_and_restores_the_default_stream():
    model_parallel_cuda_manual_seed(SEED, tp_rank=1, ep_rank=2, etp_rank=1)
    tracker = get_cuda_rng_tracker()
    first = _draw()
    with tracker.fork():
        tp_a = _draw()
    second = _draw()
    with tracker.fork():
        tp_b = _draw()
    with tracker.fork("expert-parallel-rng"):
        expert = _draw()
    with tracker.fork("data-parallel-rng"):
        data = _draw()
    default = _seeded_draws(SEED, 2)
    assert torch.equal(first, default[0]) and torch.equal(second, default[1])
    tp_stream = _seeded_draws(SEED + 2718 + 1, 2)
    assert torch.equal(tp_a, tp_stream[0]) and torch.equal(tp_b, tp_stream[1])
    assert torch.equal(expert, _seeded_draws(SEED + 1024 + 100 * 2 + 1, 1)[0])
    assert torch.equal(data, _seeded_draws(SEED, 1)[0])


def test_states_round_trip_and_misuse_is_reported():
    tracker = CudaRNGStatesTracker()
    tracker.add("a", 5)
    saved = tracker.get_states()
    with tracker.fork("a"):
        x = _draw()
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(_draw(), x)
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("a", 6)
    with pytest.raises(RuntimeError, match="already used"):
        tracker.add("b", 5)
    with pytest.raises(RuntimeError, match="model_parallel_cuda_manual_seed"):
        with tracker.fork("missing"):
            pass
    tracker.reset()
    assert not tracker.is_initialized()


def _fork_on_rank(rank, world):
    # the tp rank is taken from the default ProcessGroups that parallel_state installs
    parallel_state.initialize_model_parallel(world)
    model_parallel_cuda_manual_seed(SEED)
    with get_cuda_rng_tracker().fork():
        inside = _draw()
    return dict(inside=inside, outside=_draw())


def test_fork_differs_across_tensor_parallel_ranks():
    results = run_on_ranks(_fork_on_rank, 2)
    assert not torch.equal(results[0]["inside"], results[1]["inside"])
    assert torch.equal(results[0]["outside"], results[1]["outside"])
    for rank, res in enumerate(results):
        assert torch.equal(res["inside"], _seeded_draws(SEED + 2718 + rank, 1)[0])
        assert torch.equal(res["outside"], _seeded_draws(SEED, 1)[0])


def _block(x, weight, scale):
    """Dropout on the default stream and on the tensor-parallel stream; tuple output."""
    h = F.dropout(F.linear(x, weight), p=0.5, training=True)
    with get_cuda_rng_tracker().fork():
        h = F.dropout(torch.tanh(h), p=0.3, training=True) * scale
    return h, h.sum()


def _run(recompute):
    model_parallel_cuda_manual_seed(SEED)
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    x = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
    wrapped = lambda x_: _block(x_, weight, 2.0)
    distribute_saved_activations = False
    out, total = checkpoint(wrapped, distribute_saved_activations, x) if recompute else wrapped(x)
    (out.square().sum() + total).backward()
    return out.detach(), x.grad, weight.grad, _draw()


def test_checkpoint_with_dropout_gives_identical_grads():
    plain, recomputed = _run(False), _run(True)
    names = ("output", "input grad", "weight grad", "draw after backward")
    for name, a, b in zip(names, plain, recomputed):
        assert torch.equal(a, b), name
    # the masks really are random: a different seed changes the output
    model_parallel_cuda_manual_seed(SEED + 1)
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert not torch.equal(_block(x, weight, 2.0)[0], plain[0])
