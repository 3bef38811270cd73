"""MambaModel on a GPU (Triton conv1d, compiled SSD scan) gives the CPU reference's logits
and gradients on the same weights, fp32.

Tolerance: TF32 is switched off, so both sides do fp32 math; the compiled scan and the
Triton conv reorder sums (~1e-6 relative). 1e-4 leaves room for that over two layers and
fails any wrong term of the fast paths (which move logits by >1e-3, as the planted bugs
of test_mamba_hf_parity show). Gradients, sums over many more terms, are compared within
1e-3 of each tensor's largest gradient."""

import pytest
import torch

from tests.core.models.test_mamba_hf_parity import _hf, _ids, _ours

pytestmark = pytest.mark.gpu


def test_gpu_paths_match_cpu_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = _ours(_hf(tied=False), chunk_size=8).train()
    gpu = _ours(_hf(tied=False), chunk_size=8).train().cuda()
    ids, labels = _ids(1), _ids(2)
    loss_cpu = cpu(ids, None, None, labels=labels).mean()
    loss_gpu = gpu(ids.cuda(), None, None, labels=labels.cuda()).mean()
    loss_cpu.backward()
    loss_gpu.backward()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, atol=1e-4, rtol=1e-4)
    grads_cpu = dict(cpu.named_parameters())
    for name, param in gpu.named_parameters():
        expected = grads_cpu[name].grad
        scale = expected.abs().max().clamp(min=1e-3)
        assert (param.grad.cpu() - expected).abs().max() <= 1e-3 * scale, name
