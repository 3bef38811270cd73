"""--fp8-param-gather on one FP8 GPU (data parallel 1): the linears run ``torch._scaled_mm``
on the FP8 weights the distributed optimizer quantized from its master, and training with
the flag tracks training without it. GPU only; CI skips it (tests/core/fp8/test_param_gather.py
covers the same logic on two CPU ranks with the emulation).

Tolerance: with the flag the weights are quantized from the fp32 master instead of its bf16
rounding (and with current instead of delayed scaling under ``delayed``); both are FP8
roundings of nearly the same values, so over 4 steps at lr 1e-3 the losses agree within 1%.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.fp8.gemm import SCALED_MM, select_backend
from megatron.core.fp8.param_gather import fp8_weights
from megatron.core.fp8.scaling import compute_scale, quantize
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig


VOCAB, SEQ, BATCH, STEPS = 256, 64, 2, 4
SHAPE = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
             normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
             hidden_dropout=0.0, attention_dropout=0.0)


def _run(recipe, flag, device="cuda"):
    """(losses, per FP8 weight: it is quantize(master) exactly) of one process (no process
    group: data parallel 1). ``device`` cpu runs the same with the emulation (for CI)."""
    config = TransformerConfig(**SHAPE, fp8="hybrid", fp8_recipe=recipe, bf16=True, params_dtype=torch.bfloat16,
                               fp8_emulation=device == "cpu", use_cpu_initialization=device == "cpu")
    torch.manual_seed(1234)
    if device == "cuda":
        # Weights drawn on the GPU take the model-parallel stream of the RNG tracker.
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, parallel_output=False,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    model = model.to(device).bfloat16()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, fp8_param_gather=flag), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=True, clip_grad=1.0, use_distributed_optimizer=True),
                                 [ddp])
    losses = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        ids, labels = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(device) for _ in range(2))
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(ids, None, None, labels=labels).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        opt.step()
        losses.append(loss.item())
    ddp.finish_param_sync()
    exact = []
    if flag:
        masters = {s.model_param: s.main_param.view(s.model_param.shape) for s in opt._all_shards()}
        for param, weight in fp8_weights(ddp.module).items():
            operand = weight.scaling.weight_cache.current()
            master = masters[param]
            scale = compute_scale(master.abs().amax(), 448.0, 0, torch.ones((), device=master.device))
            expected = quantize(master, scale, torch.float8_e4m3fn)
            exact.append(operand is not None
                         and torch.equal(operand.q.view(torch.uint8), expected.view(torch.uint8)))
    return losses, exact


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_param_gather_tracks_training_without_it_on_scaled_mm(recipe):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with FP8 (compute capability >= 8.9)")
    assert select_backend(torch.device("cuda"), False) == SCALED_MM
    without, _ = _run(recipe, False)
    with_flag, exact = _run(recipe, True)
    assert with_flag == pytest.approx(without, rel=1e-2)
    assert len(exact) == 8 and all(exact)
