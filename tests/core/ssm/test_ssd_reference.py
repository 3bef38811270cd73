"""The chunked SSD scan equals the step-by-step recurrence (fp64), with and without an
initial state, for lengths that are and are not multiples of the chunk size, and its
gradients are those of the math (gradcheck)."""

import pytest
import torch

from megatron.core.ssm.causal_conv1d import causal_conv1d_reference
from megatron.core.ssm.ssd_reference import ssd_chunked, ssd_sequential


def _inputs(b=2, l=13, h=4, p=3, g=2, n=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype))
    A = -torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 16])
@pytest.mark.parametrize("h,g,n", [(4, 1, 5), (4, 2, 3), (4, 4, 8), (6, 3, 1)])
def test_chunked_equals_sequential(chunk, h, g, n):
    # fp64 and short sequences: both sides are exact up to rounding, so 1e-10 is tight
    # enough that any misplaced decay term or group mapping shows.
    x, dt, A, B, C, D = _inputs(h=h, g=g, n=n)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D, return_final_states=True)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D, return_final_states=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [3, 8])
def test_initial_states_continue_a_split_sequence(chunk):
    """Scanning [0, k) then [k, l) from the first half's final state equals one scan."""
    x, dt, A, B, C, D = _inputs(l=17)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, chunk, D, return_final_states=True)
    k = 7
    y1, s1 = ssd_chunked(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], chunk, D, return_final_states=True)
    y2, s2 = ssd_chunked(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], chunk, D, initial_states=s1,
                         return_final_states=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)
    y_seq = ssd_sequential(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], D, initial_states=s1)
    torch.testing.assert_close(y2, y_seq, rtol=1e-10, atol=1e-10)


def test_group_mapping_is_contiguous():
    """Head i reads group i // (h/g): changing group 1's B changes exactly heads 2 and 3."""
    x, dt, A, B, C, D = _inputs(h=4, g=2)
    y = ssd_chunked(x, dt, A, B, C, 4, D)
    B2 = B.clone()
    B2[:, :, 1] = torch.randn_like(B2[:, :, 1])
    y2 = ssd_chunked(x, dt, A, B2, C, 4, D)
    torch.testing.assert_close(y2[:, :, :2], y[:, :, :2])
    assert (y2[:, :, 2:] - y[:, :, 2:]).abs().max() > 1e-3


def test_gradcheck_chunked():
    x, dt, A, B, C, D = _inputs(b=1, l=6, h=2, p=2, g=1, n=2)
    s0 = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]

    def f(x, dt, A, B, C, D, s0):
        return ssd_chunked(x, dt, A, B, C, 4, D, initial_states=s0, return_final_states=True)

    assert torch.autograd.gradcheck(f, args)


def test_gradients_match_sequential():
    x, dt, A, B, C, D = _inputs(l=11)
    grads = []
    for fn in (lambda *a: ssd_sequential(*a), lambda *a: ssd_chunked(*a[:5], 4, a[5])):
        args = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]
        fn(*args).pow(2).sum().backward()
        grads.append([a.grad for a in args])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_shape_errors_are_clear():
    x, dt, A, B, C, D = _inputs(h=4, g=3)
    with pytest.raises(ValueError, match="divisible by groups"):
        ssd_chunked(x, dt, A, B, C, 4)


def test_causal_conv1d_is_causal_and_matches_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    out = causal_conv1d_reference(x, w, bias)
    for t in range(9):
        expected = bias.clone()
        for j in range(4):  # tap j of the kernel reads position t - (k - 1) + j
            src = t - 3 + j
            if src >= 0:
                expected = expected + w[:, j] * x[:, :, src]
        torch.testing.assert_close(out[:, :, t], expected)
    # Changing the future never changes the past.
    x2 = x.clone()
    x2[:, :, 6:] += 1.0
    torch.testing.assert_close(causal_conv1d_reference(x2, w, bias)[:, :, :6], out[:, :, :6])
    torch.testing.assert_close(causal_conv1d_reference(x, w, bias, "silu"), torch.nn.functional.silu(out))

