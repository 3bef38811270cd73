"""Activation recompute (full uniform / block, selective) gives the same gradients as none.

Dropout is on (hidden and attention) so the test also checks that the recompute replays
the forward's random masks. The recomputed forward runs the same fp32 ops in the same
order, so gradients agree to rounding (in practice bit for bit); 1e-6 relative allows
for a different kernel choice with and without autograd recording.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ, BATCH = 64, 8, 2
TOL = dict(atol=1e-7, rtol=1e-6)


def _model(backend="sdpa", **recompute):
    config = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.1, attention_dropout=0.1, use_cpu_initialization=True, attention_backend=backend,
        **recompute,
    )
    torch.manual_seed(0)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope").train()


def _grads(model, seed=42):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    # CPU tensors draw dropout masks from the CPU generator even where the tracker
    # tracks CUDA (a GPU machine), so seed both.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model(ids, None, None, labels=labels).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _count_calls(module_type, model):
    calls = []
    for module in model.modules():
        if isinstance(module, module_type):
            module.register_forward_hook(lambda *args: calls.append(1))
    return calls


VARIANTS = {
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-3": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
    "full-block-2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective": dict(recompute_granularity="selective"),
}
# Layer (or core-attention) forwards per step: 4 in the forward plus one per recomputed one.
EXPECTED_CALLS = {"full-uniform-1": 8, "full-uniform-3": 8, "full-block-2": 6, "selective": 8}


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recompute_gives_same_grads(variant, backend):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    reference = _grads(_model(backend))
    model = _model(backend, **VARIANTS[variant])
    counted = DotProductAttention if variant == "selective" else TransformerLayer
    calls = _count_calls(counted, model)
    got = _grads(model)
    assert len(calls) == EXPECTED_CALLS[variant], "recompute did not run the expected modules again"
    for name, grad in reference.items():
        torch.testing.assert_close(got[name], grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_dropout_is_active():
    # otherwise the RNG replay above would be untested
    a, b = _grads(_model(), seed=1), _grads(_model(), seed=2)
    assert any(not torch.allclose(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    "recompute, flag",
    [
        (dict(recompute_granularity="full"), "--recompute-method"),
        (dict(recompute_granularity="full", recompute_method="uniform"), "--recompute-num-layers"),
        (dict(recompute_granularity="selective", recompute_method="block"), "--recompute-method"),
        (dict(recompute_granularity="everything"), "--recompute-granularity"),
    ],
)
def test_bad_recompute_flags_raise(recompute, flag):
    with pytest.raises(ValueError, match=flag):
        _model(**recompute)
