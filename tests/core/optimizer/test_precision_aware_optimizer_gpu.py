"""The precision-aware and CPU-offloaded AdamW on CUDA.

fp32 states on the device take the fused kernel, as torch.optim.AdamW(fused=True) does, so
they match it bit for bit. An offloaded param steps on the CPU (torch's single-tensor AdamW),
which differs from the fused GPU kernel only by rounding: 1e-6 (fp32 params) after 3 steps at lr 1e-2 is
~1e4 x fp32 epsilon and far below one step (1e-2). With --overlap-cpu-optimizer-d2h-h2d the
copies run on side streams and must give exactly the synchronous result.
"""

import pytest
import torch

from megatron.core.optimizer import PrecisionAwareAdamW
from megatron.core.optimizer.cpu_offload import offloaded_params

KWARGS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _run(make, dtype=torch.float32, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32)).cuda().to(dtype)
    opt = make(model)
    for step in range(steps):
        g = torch.Generator(device="cuda").manual_seed(step)
        x = torch.randn(8, 64, device="cuda", generator=g, dtype=dtype)
        model.zero_grad()
        model(x).float().pow(2).sum().backward()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().float().clone() for p in model.parameters()], opt


def _precision_aware(fraction, overlap=False, **kwargs):
    def make(model):
        opt = PrecisionAwareAdamW(model.parameters(), overlap_d2h_h2d=overlap, **KWARGS, **kwargs)
        opt.init_storage(offloaded_params(model.parameters(), fraction))
        return opt
    return make


@pytest.mark.gpu
def test_fp32_on_device_matches_fused_adamw_exactly():
    ref, _ = _run(lambda m: torch.optim.AdamW(m.parameters(), fused=True, **KWARGS))
    got, _ = _run(_precision_aware(0.0))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_step_runs_on_pinned_cpu_state_and_overlap_changes_nothing(dtype):
    ref, _ = _run(_precision_aware(0.0), dtype)
    sync, opt = _run(_precision_aware(1.0), dtype)
    overlapped, opt_overlap = _run(_precision_aware(1.0, overlap=True), dtype)
    for p in opt.offloaded:
        master = opt.state[p]["master_param"]
        assert master.device.type == "cpu" and master.is_pinned()
        assert opt.state[p]["exp_avg"].device.type == "cpu"
        assert opt._cpu_grads[p].is_pinned()
    # bf16 params: a rounding difference of the fp32 masters may flip one bf16 ulp (<= 1e-3 here).
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b, c in zip(ref, sync, overlapped):
        torch.testing.assert_close(b, a, rtol=0, atol=atol)
        assert torch.equal(b, c)
