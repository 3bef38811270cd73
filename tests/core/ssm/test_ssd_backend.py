"""How ssd_scan picks its backend off the GPU: the environment's request is validated, and
without CUDA every request runs the reference (the GPU choices are in test_ssd_gpu.py)."""

import pytest
import torch

from megatron.core.ssm import ssd
from megatron.core.ssm.ssd_reference import ssd_chunked


def _inputs():
    torch.manual_seed(0)
    x, B, C = torch.randn(1, 10, 2, 4), torch.randn(1, 10, 1, 3), torch.randn(1, 10, 1, 3)
    dt, A = torch.rand(1, 10, 2), -torch.rand(2)
    return x, dt, A, B, C


def test_unknown_backend_is_refused_naming_the_variable(monkeypatch):
    x, dt, A, B, C = _inputs()
    monkeypatch.setenv(ssd.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="MEGATRON_SSD_BACKEND.*triton, compile, reference"):
        ssd.ssd_scan(x, dt, A, B, C, 4)
    with pytest.raises(ValueError, match="backend argument"):
        ssd.ssd_scan(x, dt, A, B, C, 4, backend="fast")


@pytest.mark.parametrize("request_", ["", "triton", "compile", "reference"])
def test_cpu_runs_the_reference_whatever_is_requested(monkeypatch, request_):
    x, dt, A, B, C = _inputs()
    monkeypatch.setenv(ssd.BACKEND_ENV, request_)
    assert ssd.choose_backend(x, B, 4) == "reference"
    torch.testing.assert_close(ssd.ssd_scan(x, dt, A, B, C, 4), ssd_chunked(x, dt, A, B, C, 4))


def test_kernel_shape_limits():
    pytest.importorskip("triton")
    from megatron.core.ssm.ssd_triton import supports

    assert supports(128, 64, 128) and supports(128, 128, 128) and supports(64, 64, 256)
    # A [128, 256] state tile needs more shared memory than a Hopper SM has (the dC kernel).
    assert not supports(128, 128, 256) and not supports(128, 256, 256)
    assert not supports(100, 64, 64) and not supports(512, 64, 64) and not supports(128, 64, 64, torch.float16)
