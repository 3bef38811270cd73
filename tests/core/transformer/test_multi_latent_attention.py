"""Multi-latent attention: the module against a hand-written forward from the weights,
the GPT layer spec and the config refusals, and TP=2 equal to one process (gloo)."""

import io
import math

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.core.models.test_gpt_tensor_parallel import _full_grad
from tests.multirank import run_on_ranks

MLA = dict(
    num_layers=2, hidden_size=32, num_attention_heads=4, multi_latent_attention=True, kv_lora_rank=16,
    qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6, normalization="RMSNorm", qk_layernorm=True,
    add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
)


def _config(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**MLA, **overrides})


def _rope_ref(x, pos):
    """DeepSeek's RoPE on adjacent pairs (x0, x1), (x2, x3)... with frequency index i."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos[:, None].float() * inv[None, :]  # [s, d/2]
    cos, sin = ang.cos()[:, None, None, :], ang.sin()[:, None, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    # de-interleaved output ordering: [rotated evens ; rotated odds]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _reference(attn: MLASelfAttention, x: torch.Tensor, c: TransformerConfig) -> torch.Tensor:
    s, b, _ = x.shape
    n, dq, dr, dv = c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim
    if c.q_lora_rank is None:
        q = x @ attn.linear_q_proj.weight.T
    else:
        q = _rms(x @ attn.linear_q_down_proj.weight.T, attn.q_layernorm.weight) @ attn.linear_q_up_proj.weight.T
    q = q.view(s, b, n, dq + dr)
    ckv = x @ attn.linear_kv_down_proj.weight.T
    latent, k_pe = ckv[..., : c.kv_lora_rank], ckv[..., c.kv_lora_rank:]
    kv = (_rms(latent, attn.kv_layernorm.weight) @ attn.linear_kv_up_proj.weight.T).view(s, b, n, dq + dv)
    pos = torch.arange(s)
    q_full = torch.cat((q[..., :dq], _rope_ref(q[..., dq:], pos)), -1)
    k_pe = _rope_ref(k_pe.view(s, b, 1, dr), pos).expand(s, b, n, dr)
    k_full = torch.cat((kv[..., :dq], k_pe), -1)
    scores = torch.einsum("sbnd,tbnd->bnst", q_full, k_full) / math.sqrt(dq + dr)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    ctx = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), kv[..., dq:]).reshape(s, b, n * dv)
    return ctx @ attn.linear_proj.weight.T


@pytest.mark.parametrize("q_lora_rank, v_head_dim", [(None, 6), (12, 6), (12, 16)])
def test_mla_matches_reference(q_lora_rank, v_head_dim):
    torch.manual_seed(0)
    config = _config(q_lora_rank=q_lora_rank, v_head_dim=v_head_dim)
    model = GPTModel(config, vocab_size=64, max_sequence_length=16, position_embedding_type="rope")
    attn = model.decoder.layers[0].self_attention
    assert isinstance(attn, MLASelfAttention)
    for norm in (getattr(attn, "q_layernorm", None), attn.kv_layernorm):
        if norm is not None:
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(7, 2, config.hidden_size)
    freqs = model.rotary_pos_emb(7)
    out, bias = attn(x, rotary_pos_emb=freqs)
    assert bias is None
    torch.testing.assert_close(out, _reference(attn, x, config), atol=1e-5, rtol=1e-5)


def test_state_dict_uses_megatron_names():
    model = GPTModel(_config(q_lora_rank=12), vocab_size=64, max_sequence_length=16, position_embedding_type="rope")
    keys = {k.split("self_attention.", 1)[1] for k in model.state_dict() if "layers.0.self_attention." in k}
    assert keys == {
        "linear_q_down_proj.weight", "q_layernorm.weight", "linear_q_up_proj.weight", "linear_kv_down_proj.weight",
        "kv_layernorm.weight", "linear_kv_up_proj.weight", "linear_proj.weight",
    }
    assert model.decoder.layers[0].self_attention.linear_kv_down_proj.weight.shape == (16 + 4, 32)


def test_layer_spec_agrees_with_config():
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True, normalization="RMSNorm")
    GPTModel(_config(), vocab_size=64, max_sequence_length=16, position_embedding_type="rope",
             transformer_layer_spec=spec)
    with pytest.raises(ValueError, match="multi_latent_attention"):
        GPTModel(_config(), vocab_size=64, max_sequence_length=16, position_embedding_type="rope",
                 transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"))


@pytest.mark.parametrize("overrides, match", [
    (dict(num_query_groups=2), "grouped-query"),
    (dict(rotary_scaling_factor=0.5), "--rotary-scaling-factor"),
    (dict(multi_latent_attention=False, rope_type="yarn"), "--multi-latent-attention"),
    (dict(multi_latent_attention=False, rotary_scaling_factor=4.0), "--multi-latent-attention"),
    (dict(qk_pos_emb_head_dim=5), "--qk-pos-emb-head-dim"),
    (dict(kv_lora_rank=0), "--kv-lora-rank"),
    (dict(rotary_interleaved=True), "--rotary-interleaved"),
])
def test_config_refusals(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_needs_rope():
    with pytest.raises(ValueError, match="--position-embedding-type rope"):
        GPTModel(_config(), vocab_size=64, max_sequence_length=16, position_embedding_type="learned_absolute")


VOCAB, SEQ, BATCH = 64, 8, 2


def _build_tp(tp: int, sequence_parallel: bool = False) -> GPTModel:
    config = _config(q_lora_rank=12, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    torch.manual_seed(1234)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, parallel_output=False,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _run(model):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    loss = model(ids, None, None, labels=labels)
    loss.sum().backward()
    return loss.detach()


def _tp_rank_fn(rank, world_size):
    groups = parallel_state.initialize_model_parallel(world_size, 1)
    out = {}
    for sp in (False, True):
        model = _build_tp(world_size, sp)
        loss = _run(model)
        out[sp] = dict(loss=loss, grads={name: _full_grad(p, groups.tp) for name, p in model.named_parameters()})
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tp2_results():
    return [torch.load(io.BytesIO(blob)) for blob in run_on_ranks(_tp_rank_fn, 2)]


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_matches_tp1(tp2_results, sequence_parallel):
    """Replicated down projections (grads summed under sequence parallelism), the shared
    RoPE key part's gradient summed over heads of both ranks: as one process."""
    reference = _build_tp(1)
    loss = _run(reference)
    for rank, results in enumerate(tp2_results):
        got = results[sequence_parallel]
        torch.testing.assert_close(got["loss"], loss, atol=1e-6, rtol=1e-5)
        for name, param in reference.named_parameters():
            torch.testing.assert_close(got["grads"][name], param.grad, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name: f"rank {rank} grad {n}: {m}")


def test_selective_recompute_gives_the_same_gradients():
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    grads = []
    for granularity in (None, "selective"):
        torch.manual_seed(0)
        model = GPTModel(_config(q_lora_rank=12, recompute_granularity=granularity), vocab_size=64,
                         max_sequence_length=16, position_embedding_type="rope").train()
        model(ids, None, None, labels=ids).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("v_head_dim", [6, 16])
def test_kv_cache_generation_equals_full_forward(v_head_dim):
    """Prefill, then one token at a time: every cached forward's logits equal the full
    sequence's (values narrower and wider than the query/key heads)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    torch.manual_seed(0)
    model = GPTModel(_config(q_lora_rank=12, v_head_dim=v_head_dim), vocab_size=64, max_sequence_length=16,
                     position_embedding_type="rope").eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids, None, None)
        context = StaticInferenceContext(2, 16)
        for start, end in [(0, 4)] + [(p, p + 1) for p in range(4, 10)]:
            got = model(ids[:, start:end], torch.arange(start, end).expand(2, -1), None, inference_context=context)
            context.increment(end - start)
            torch.testing.assert_close(got, full[:, start:end], atol=1e-5, rtol=1e-5)
