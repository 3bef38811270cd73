"""GPTModel with every fusion on (compiled regions forced on CPU, chunked cross entropy)
equals the model with every fusion off: losses and all parameter grads, fp32.

Tolerance 1e-5 relative: the same math in another operation order over two layers.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ, BATCH = 96, 12, 2
TOL = dict(atol=1e-5, rtol=1e-5)
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "persist_layer_norm",
           "cross_entropy_loss_fusion")
CASES = {
    "gpt": (dict(num_layers=2, hidden_size=32, num_attention_heads=4), dict(position_embedding_type="learned_absolute")),
    "llama": (
        dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
             normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False),
        dict(position_embedding_type="rope", share_embeddings_and_output_weights=False),
    ),
}


def _model(case, fused, dtype=torch.float32, device="cpu"):
    config_kwargs, model_kwargs = CASES[case]
    config = TransformerConfig(
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        **config_kwargs, **{name: fused for name in FUSIONS},
    )
    torch.manual_seed(0)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, **model_kwargs).to(device)


def _loss_and_grads(model, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(device)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(device)
    loss = model(ids, None, None, labels=labels)
    loss.mean().backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["gpt", "llama"])
def test_all_fusions_on_equals_off(traced, case):
    fused_loss, fused_grads = _loss_and_grads(_model(case, True))
    loss, grads = _loss_and_grads(_model(case, False))
    torch.testing.assert_close(fused_loss, loss, **TOL)
    assert fused_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_fusions_default_on_except_cross_entropy():
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    assert all(getattr(config, name) for name in FUSIONS[:-1])
    assert config.cross_entropy_loss_fusion is False and config.cross_entropy_fusion_impl == "native"


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["gpt", "llama"])
def test_bf16_cuda_all_fusions_on_close_to_off(case):
    fused_loss, fused_grads = _loss_and_grads(_model(case, True, torch.bfloat16, "cuda"), "cuda")
    loss, grads = _loss_and_grads(_model(case, False, torch.bfloat16, "cuda"), "cuda")
    # bf16 rounds differently inside fused kernels (once per kernel instead of per op)
    torch.testing.assert_close(fused_loss, loss, atol=5e-2, rtol=2e-2)
    for name in grads:
        scale = grads[name].float().abs().max().clamp_min(1e-3)
        torch.testing.assert_close(fused_grads[name].float() / scale, grads[name].float() / scale, atol=5e-2, rtol=0)
