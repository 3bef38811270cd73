"""Grouped-query attention through SDPA's enable_gqa equals SDPA on K/V repeated to the
query heads and the unfused reference; the CUDA backend order is cuDNN, flash,
efficient, math.

Tolerance 1e-5: fp32 attention over 16 keys, accumulated in another order.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from megatron.core.fusions.sdpa_backends import (
    SDPA_BACKEND_PRIORITY,
    backend_order_names,
    repeat_kv_for_cudnn,
    sdpa_backend_priority,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_config import TransformerConfig

TOL = dict(atol=1e-5, rtol=1e-5)
SQ, B, NP, NG, HN = 16, 2, 4, 2, 8


def _qkv(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(SQ, B, NP, HN, generator=gen).to(device, dtype)
    k = torch.randn(SQ, B, NG, HN, generator=gen).to(device, dtype)
    v = torch.randn(SQ, B, NG, HN, generator=gen).to(device, dtype)
    return q, k, v


def _attention(backend, device="cpu"):
    config = TransformerConfig(
        num_layers=1, hidden_size=NP * HN, num_attention_heads=NP, num_query_groups=NG,
        attention_dropout=0.0, attention_backend=backend,
    )
    return DotProductAttention(config, layer_number=1).to(device)


def test_enable_gqa_equals_repeated_kv_and_unfused():
    q, k, v = _qkv()
    gqa = _attention("sdpa")(q, k, v)
    repeat = NP // NG
    expanded = _attention("sdpa")(q, k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2))
    unfused = _attention("unfused")(q, k, v)
    torch.testing.assert_close(gqa, expanded, **TOL)
    torch.testing.assert_close(gqa, unfused, **TOL)


def test_repeat_interleave_matches_the_group_of_each_query_head():
    # head h uses group h // (np / ng): repeat_interleave, not repeat, is the matching expansion
    q, k, v = _qkv()
    bhsd = lambda t: t.permute(1, 2, 0, 3)  # noqa: E731
    want = F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), is_causal=True, enable_gqa=True)
    got = F.scaled_dot_product_attention(
        bhsd(q), bhsd(k).repeat_interleave(NP // NG, 1), bhsd(v).repeat_interleave(NP // NG, 1), is_causal=True
    )
    torch.testing.assert_close(got, want, **TOL)


def test_backend_order_is_cudnn_flash_efficient_math():
    assert SDPA_BACKEND_PRIORITY == (
        SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH
    )
    assert backend_order_names() == "cudnn, flash, efficient, math"


def test_cpu_keeps_torch_backend_choice_and_never_repeats_kv():
    q, k, v = (t.permute(1, 2, 0, 3) for t in _qkv())
    with sdpa_backend_priority(torch.device("cpu")) as ctx:
        assert ctx is None
    assert repeat_kv_for_cudnn(q, k, v, None, 0.0, True) is False


@pytest.mark.gpu
def test_bf16_cuda_gqa_sdpa_matches_unfused_and_logs_order(caplog):
    q, k, v = (t.requires_grad_() for t in _qkv(torch.bfloat16, "cuda"))
    with caplog.at_level("INFO"):
        fast = _attention("sdpa", "cuda")(q, k, v)
    reference = _attention("unfused", "cuda")(q, k, v)
    torch.testing.assert_close(fast.float(), reference.float(), atol=2e-2, rtol=2e-2)
    fast.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
