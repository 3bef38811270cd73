"""--softmax-type off-by-one / learnable (attention sinks) and --qk-l2-norm.

References are written from the definitions with plain loops: the off-by-one softmax is
exp(s_j) / (exp(t) + sum_k exp(s_k)) with t = 0 (off-by-one) or the head's learned logit
(learnable), and the extra key has a zero value; the L2 norm is x / sqrt(mean(x^2) + eps).
Tolerance: fp32 attention over <= 12 keys, the backends only reorder fp32 sums (~1e-7);
1e-6 sits above that and far below the effect of a sink on the wrong head or a missing
sink (~1e-2 with logits of order 1). Gradients of a squared loss sum many terms of order 1,
so they get 1e-5.
"""

import math

import pytest
import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.inference import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.spec_check import check_layer_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.torch_norm import L2Norm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import core_transformer_config_from_args

S, B, NP, NG, HN = 6, 2, 4, 2, 8
TOL = dict(atol=1e-6, rtol=1e-6)
GRAD_TOL = dict(atol=1e-5, rtol=1e-5)
SINKS = torch.tensor([0.5, -1.0, 2.0, 0.25])


def _config(backend="unfused", softmax_type="learnable", **kw):
    return TransformerConfig(
        num_layers=2, hidden_size=NP * HN, num_attention_heads=NP, num_query_groups=NG, attention_dropout=0.0,
        attention_backend=backend, softmax_type=softmax_type, **kw,
    )


def _attention(backend, softmax_type, sinks=SINKS):
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    attention = DotProductAttention(_config(backend, softmax_type), layer_number=1)
    if softmax_type == "learnable":
        with torch.no_grad():
            attention.softmax_offset.copy_(sinks)
    return attention


def _qkv():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(S, B, NP, HN, generator=gen)
    return q, torch.randn(S, B, NG, HN, generator=gen), torch.randn(S, B, NG, HN, generator=gen)


def _mask():
    """A padding mask with one fully masked row (batch 0, query 2) and causal structure."""
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(B, 1, S, S, generator=gen) < 0.3) | torch.ones(S, S, dtype=torch.bool).triu(1)
    mask[0, 0, 2, :] = True
    return mask


def _reference(q, k, v, mask, sinks):
    """Loops over the definition; query head h reads key/value group h // (NP / NG)."""
    out = torch.zeros(S, B, NP, HN)
    sink_probs = torch.zeros(B, NP, S)
    for b in range(B):
        for h in range(NP):
            g = h // (NP // NG)
            for i in range(S):
                allowed = [j for j in range(S) if not mask[b, 0, i, j]]
                scores = torch.stack([q[i, b, h] @ k[j, b, g] / math.sqrt(HN) for j in allowed]) if allowed else None
                denominator = math.exp(sinks[h]) + (scores.exp().sum() if allowed else 0.0)
                for n, j in enumerate(allowed):
                    out[i, b, h] += scores[n].exp() / denominator * v[j, b, g]
                sink_probs[b, h, i] = math.exp(sinks[h]) / denominator
    return out.reshape(S, B, NP * HN), sink_probs


@pytest.mark.parametrize("backend", ["unfused", "sdpa"])
@pytest.mark.parametrize("softmax_type", ["off-by-one", "learnable"])
def test_matches_hand_computation_with_masked_row_and_gqa(backend, softmax_type):
    q, k, v = _qkv()
    mask = _mask()
    sinks = SINKS if softmax_type == "learnable" else torch.zeros(NP)
    expected, _ = _reference(q, k, v, mask, sinks)
    got = _attention(backend, softmax_type)(q, k, v, mask, AttnMaskType.padding)
    torch.testing.assert_close(got, expected, **TOL)
    # the fully masked row attends only to the zero-valued extra key
    assert got.view(S, B, NP, HN)[2, 0].abs().max() == 0


def test_one_row_by_hand():
    """Scores ln 1 and ln 3 with sink logit 0: probabilities 1/5 and 3/5."""
    config = TransformerConfig(num_layers=1, hidden_size=2, num_attention_heads=1, kv_channels=1,
                               attention_dropout=0.0, attention_backend="unfused", softmax_type="off-by-one")
    attention = DotProductAttention(config, 1, AttnMaskType.no_mask, softmax_scale=1.0)
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, math.log(3.0)]).view(2, 1, 1, 1)
    v = torch.tensor([10.0, 20.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(attention(q, k, v), torch.tensor([[[10.0 / 5 + 20.0 * 3 / 5]]]))


@pytest.mark.parametrize("backend", ["unfused", "sdpa"])
def test_sink_gradient_by_hand(backend):
    """d out / d t = -p_t * out for the sink logit t, so the grad of out.sum() is
    -sum over rows of p_t * sum(out row) per head."""
    q, k, v = _qkv()
    mask = _mask()
    attention = _attention(backend, "learnable")
    out = attention(q, k, v, mask, AttnMaskType.padding)
    out.sum().backward()
    expected_out, sink_probs = _reference(q, k, v, mask, SINKS)
    row_sums = expected_out.view(S, B, NP, HN).sum(-1).permute(1, 2, 0)  # [B, NP, S]
    expected_grad = -(sink_probs * row_sums).sum(dim=(0, 2))
    torch.testing.assert_close(attention.softmax_offset.grad, expected_grad, **TOL)


@pytest.mark.parametrize("softmax_type", ["off-by-one", "learnable"])
@pytest.mark.parametrize("case", ["causal", "window", "decode"])
def test_backends_agree(softmax_type, case):
    q, k, v = _qkv()
    if case == "decode":
        q = q[-2:]  # two new queries against all cached keys
    results = []
    for backend in ("unfused", "sdpa"):
        config = _config(backend, softmax_type, window_size=(2, 0) if case == "window" else None)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        attention = DotProductAttention(config, layer_number=1)
        if softmax_type == "learnable":
            with torch.no_grad():
                attention.softmax_offset.copy_(SINKS)
        query = q.clone().requires_grad_(True)
        out = attention(query, k, v)
        out.square().sum().backward()
        sink_grad = attention.softmax_offset.grad if softmax_type == "learnable" else None
        results.append((out.detach(), query.grad, sink_grad))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for got, expected in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(got, expected, **GRAD_TOL)


def test_offset_storage_and_names():
    off_by_one = _attention("unfused", "off-by-one")
    assert not list(off_by_one.parameters()) and "softmax_offset" not in off_by_one.state_dict()
    learnable = _attention("unfused", "learnable")
    assert list(learnable.state_dict()) == ["softmax_offset"]
    offset = learnable.softmax_offset
    assert (offset.tensor_model_parallel, offset.partition_dim, offset.partition_stride) == (True, 0, 1)
    assert _attention("unfused", "vanilla").softmax_offset is None


def test_config_refusals():
    with pytest.raises(ValueError, match="--softmax-type must be"):
        _config(softmax_type="sink")
    with pytest.raises(ValueError, match="--qk-l2-norm .* --qk-layernorm"):
        _config(qk_l2_norm=True, qk_layernorm=True)


def test_l2_norm_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    expected = torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5 + 1e-5)
    got = L2Norm(2, eps=1e-5)(x)
    torch.testing.assert_close(got[:1], expected)
    assert torch.equal(got[1], torch.zeros(2))


def test_self_attention_normalizes_q_and_k_per_head():
    """q and k leave the projection with unit root-mean-square per head (the epsilon is
    --norm-epsilon); values are untouched."""
    config = _config(softmax_type="vanilla", qk_l2_norm=True, layernorm_epsilon=1e-6, use_cpu_initialization=True)
    torch.manual_seed(0)
    attention = SelfAttention(config, layer_number=1)
    assert not [n for n, _ in attention.named_parameters() if "layernorm" in n]
    hidden = torch.randn(S, B, NP * HN)
    query, key, value = attention.get_query_key_value_tensors(hidden)
    raw_q = attention.linear_qkv(hidden)[0].view(S, B, NG, (NP // NG + 2) * HN)[..., :HN]
    expected = raw_q / torch.sqrt(raw_q.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(query[:, :, 0], expected[:, :, 0], **TOL)
    for t in (query, key):
        torch.testing.assert_close(t.square().mean(-1), torch.ones(t.shape[:-1]), atol=1e-3, rtol=0)
    assert value.square().mean(-1).sub(1).abs().max() > 0.1


def test_spec_carries_l2_norm():
    spec = get_gpt_layer_local_spec(qk_l2_norm=True)
    assert spec.submodules.self_attention.submodules.q_layernorm is L2Norm
    check_layer_spec(spec, _config(softmax_type="vanilla", qk_l2_norm=True))
    with pytest.raises(ValueError, match="qk_l2_norm"):
        check_layer_spec(spec, _config(softmax_type="vanilla"))


def _gpt(**kw):
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, attention_dropout=0.0,
        hidden_dropout=0.0, use_cpu_initialization=True, normalization="RMSNorm", **kw,
    )
    torch.manual_seed(0)
    return GPTModel(config, vocab_size=64, max_sequence_length=16, position_embedding_type="rope").eval()


def test_kv_cache_decode_equals_full_forward_with_sinks_and_l2_norm():
    model = _gpt(softmax_type="learnable", qk_l2_norm=True)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.softmax_offset.copy_(SINKS)
    assert "decoder.layers.1.self_attention.core_attention.softmax_offset" in model.state_dict()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, None, None)
        context = StaticInferenceContext(2, 10)
        for start, end in [(0, 4)] + [(p, p + 1) for p in range(4, 10)]:
            positions = torch.arange(start, end).expand(2, -1)
            got = model(ids[:, start:end], positions, None, inference_context=context)
            context.increment(end - start)
            torch.testing.assert_close(got, full[:, start:end], atol=1e-5, rtol=1e-5)


def test_flags_reach_the_config():
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "1"]
    default = core_transformer_config_from_args(parse_and_validate(base))
    assert (default.softmax_type, default.qk_l2_norm) == ("vanilla", False)
    args = parse_and_validate(base + ["--softmax-type", "learnable", "--qk-l2-norm"])
    config = core_transformer_config_from_args(args)
    assert (config.softmax_type, config.qk_l2_norm) == ("learnable", True)


def test_context_parallel_is_refused(monkeypatch):
    """A context-parallel group of 2 (faked: the refusal comes before any communication)."""
    monkeypatch.setattr(process_groups, "group_size", lambda group: 2)
    with pytest.raises(ValueError, match="--softmax-type learnable is not supported with --context-parallel-size"):
        DotProductAttention(_config(), layer_number=1)
