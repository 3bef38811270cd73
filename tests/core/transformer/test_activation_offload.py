"""--cpu-offloading-num-layers: the first N layers' saved activations go to CPU memory and
come back for backward; the tensors are copies of the same values, so the gradients are
bit-identical to a run without offloading (dropout on: the masks are saved tensors too).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import activation_offload
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ, BATCH = 64, 8, 2


def _model(**extra):
    config = TransformerConfig(
        num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, gated_linear_unit=True,
        activation_func=F.silu, hidden_dropout=0.1, attention_dropout=0.1, use_cpu_initialization=True, **extra)
    torch.manual_seed(0)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ).train()


def _grads(model):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    torch.manual_seed(42)
    tensor_parallel.model_parallel_cuda_manual_seed(42)
    model(ids, None, None, labels=labels).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_offloaded_layers_give_bit_identical_grads(monkeypatch):
    packed = []
    real_save_on_cpu = torch.autograd.graph.save_on_cpu

    class CountingSaveOnCpu(real_save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: (packed.append(tensor.shape), pack(tensor))[1]

    reference = _grads(_model())
    monkeypatch.setattr(activation_offload.torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    got = _grads(_model(cpu_offloading_num_layers=2))
    assert len(packed) > 10, "the offloading hooks did not see the layers' saved tensors"
    for name, grad in reference.items():
        assert torch.equal(got[name], grad), name


@pytest.mark.parametrize("extra, message", [
    (dict(cpu_offloading_num_layers=3), r"must be in \[0, --num-layers 3\)"),
    (dict(cpu_offloading_num_layers=1, recompute_granularity="selective"), "activation recompute"),
])
def test_megatron_rules(extra, message):
    with pytest.raises(ValueError, match=message):
        _model(**extra)
