"""Multi-token prediction: GPTModel's MTP depths against a hand-written reference, the
gradient they send back, evaluation ignoring them, refused settings, and TP=2 == TP=1."""

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.multi_token_prediction import mtp_loss_tracker
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.core.models.test_gpt_tensor_parallel import _full_grad
from tests.multirank import run_on_ranks

VOCAB, SEQ, BATCH = 64, 8, 2


def _build(mtp_layers=2, tp=1, position="rope", factor=0.3, **moe):
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, mtp_num_layers=mtp_layers, mtp_loss_scaling_factor=factor,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, **moe,
    )
    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type=position,
                    share_embeddings_and_output_weights=False)


def _data():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
    return ids, labels, mask


def _shift(t, k):
    """t[:, i + k] at position i, zeros in the last k positions (written without torch.roll)."""
    return torch.cat([t[:, k:], torch.zeros_like(t[:, :k])], dim=1)


def _reference(model, ids, labels, mask):
    """LM mean loss, per-depth mean losses, and the training objective, spelled out."""
    emb = model.embedding(ids)
    rotary = model._rotary_freqs(emb)
    hidden = model.decoder(emb, rotary_pos_emb=rotary)
    out_w = model.output_layer.weight

    def mean_loss(h, lab, m):
        logits = F.linear(h, out_w).transpose(0, 1)  # [b, s, V]
        tok = F.cross_entropy(logits.reshape(-1, VOCAB), lab.reshape(-1), reduction="none")
        return (tok * m.reshape(-1)).sum() / m.sum()

    lm = mean_loss(hidden, labels, mask)
    depth_losses = []
    for k, layer in enumerate(model.mtp.layers, start=1):
        e = layer.enorm(model.embedding(_shift(ids, k)))
        x = F.linear(torch.cat([e, layer.hnorm(hidden)], dim=-1), layer.eh_proj.weight)
        hidden = layer.final_layernorm(layer.transformer_layer(x, rotary_pos_emb=rotary)[0])
        depth_losses.append(mean_loss(hidden, _shift(labels, k), _shift(mask, k)))
    factor = model.config.mtp_loss_scaling_factor
    return lm, depth_losses, lm + factor / len(depth_losses) * sum(depth_losses)


MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[0, 1], moe_ffn_hidden_size=16,
           moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_mtp_loss_and_gradients_match_reference(moe):
    """With MoE the MTP layers follow the decoder's last layer (MoE here, dense first layer)."""
    ids, labels, mask = _data()
    model = _build(**(MOE if moe else {}))
    mtp_loss_tracker().pop(2)
    tok = model(ids, None, None, labels=labels, loss_mask=mask)
    ((tok * mask).sum() / mask.sum()).backward()
    recorded = mtp_loss_tracker().pop(2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    lm, depth_losses, objective = _reference(model, ids, labels, mask)
    objective.backward()
    torch.testing.assert_close((tok * mask).sum() / mask.sum(), lm)  # the returned loss is the LM loss only
    torch.testing.assert_close(recorded, torch.stack(depth_losses).detach())
    names = [n for n, _ in model.named_parameters()]
    assert "mtp.layers.1.eh_proj.weight" in names
    if moe:
        assert "mtp.layers.1.transformer_layer.mlp.router.weight" in names
        assert "decoder.layers.0.mlp.linear_fc1.weight" in names
    else:
        assert "mtp.layers.0.transformer_layer.mlp.linear_fc1.weight" in names
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=lambda m: f"{name}: {m}")
        if name.startswith("mtp.") or name == "embedding.word_embeddings.weight":
            assert grads[name].abs().sum() > 0, name


def test_mtp_term_changes_the_shared_embedding_gradient():
    ids, labels, mask = _data()
    grads = []
    for factor in (0.0, 1.0):
        model = _build(factor=factor)
        tok = model(ids, None, None, labels=labels, loss_mask=mask)
        (tok * mask).sum().backward()
        grads.append(model.embedding.word_embeddings.weight.grad)
    mtp_loss_tracker().pop(2)
    assert not torch.allclose(grads[0], grads[1])


def test_evaluation_ignores_mtp():
    ids, labels, mask = _data()
    model = _build()
    mtp_loss_tracker().pop(2)
    model.eval()
    with torch.no_grad():
        tok = model(ids, None, None, labels=labels, loss_mask=mask)
    lm, _, _ = _reference(model, ids, labels, mask)
    torch.testing.assert_close((tok * mask).sum() / mask.sum(), lm)
    assert not mtp_loss_tracker().values


def test_learned_absolute_positions_are_refused():
    with pytest.raises(ValueError, match="--mtp-num-layers needs --position-embedding-type rope or none"):
        _build(position="learned_absolute")


def _tp_rank_fn(rank, world_size):
    groups = parallel_state.initialize_model_parallel(world_size, 1)
    ids, labels, mask = _data()
    model = _build(tp=world_size)
    tok = model(ids, None, None, labels=labels, loss_mask=mask)
    (tok * mask).sum().backward()
    recorded = mtp_loss_tracker().pop(2)
    grads = {name: _full_grad(p, groups.tp) for name, p in model.named_parameters()}
    buffer = io.BytesIO()
    torch.save(dict(loss=tok.detach(), recorded=recorded, grads=grads), buffer)
    dist.barrier()
    return buffer.getvalue()


def test_tp2_matches_tp1():
    ids, labels, mask = _data()
    model = _build()
    mtp_loss_tracker().pop(2)
    tok = model(ids, None, None, labels=labels, loss_mask=mask)
    (tok * mask).sum().backward()
    recorded = mtp_loss_tracker().pop(2)
    for blob in run_on_ranks(_tp_rank_fn, 2):
        got = torch.load(io.BytesIO(blob))
        torch.testing.assert_close(got["loss"], tok.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["recorded"], recorded, atol=1e-6, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")

