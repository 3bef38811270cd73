"""The attn_mask form handed to SDPA: a key-padding mask as an additive bias (the form cuDNN
serves fastest), any other mask as torch's bool form; both give the bool mask's attention."""

import torch
import torch.nn.functional as F

from megatron.core.fusions.sdpa_backends import sdpa_attn_mask


def _inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8) for _ in range(3))
    lengths = torch.tensor([7, 4, 1])
    masked = (torch.arange(7)[None, :] >= lengths[:, None])[:, None, None, :]  # True = hidden key
    return q, k, v, masked


def test_key_padding_mask_goes_as_an_additive_bias_with_the_same_attention():
    q, k, v, masked = _inputs()
    bias = sdpa_attn_mask(masked, q.dtype)
    assert bias.dtype == q.dtype and bias.shape == masked.shape
    assert torch.equal(bias == 0, ~masked) and (bias[masked] == torch.finfo(q.dtype).min).all()
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # A hidden key gets no weight: changing its value changes nothing.
    v2 = v.clone()
    v2[1, :, 4:] = 1e3
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v2, attn_mask=bias), got, rtol=0, atol=1e-6)


def test_other_masks_go_as_bool():
    q, k, v, masked = _inputs()
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1).view(1, 1, 7, 7) | masked
    form = sdpa_attn_mask(causal, q.dtype)
    assert form.dtype == torch.bool and torch.equal(form, ~causal)
