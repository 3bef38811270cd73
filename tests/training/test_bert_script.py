"""pretrain_bert.py's pieces without a run: Megatron's BERT loss and its report, how the
chunks of an interleaved BERT read data, and the BERT FLOP count."""

from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

import pretrain_bert
from megatron.training.flops import bert_floating_point_operations, num_floating_point_operations


def test_loss_is_masked_lm_mean_plus_sentence_order_loss():
    torch.manual_seed(0)
    lm_losses = torch.rand(2, 8)
    loss_mask = torch.zeros(2, 8)
    loss_mask[0, 1] = loss_mask[1, 3] = loss_mask[1, 4] = 1
    sop_logits, order = torch.randn(2, 2), torch.tensor([1, 0])
    loss, report = pretrain_bert.loss_func(loss_mask, order, (lm_losses, sop_logits))
    lm = (lm_losses[0, 1] + lm_losses[1, 3] + lm_losses[1, 4]) / 3
    sop = F.cross_entropy(sop_logits, order)
    torch.testing.assert_close(report["lm loss"], lm)
    torch.testing.assert_close(report["sop loss"], sop)
    torch.testing.assert_close(loss, lm + sop)
    loss, report = pretrain_bert.loss_func(loss_mask, order, (lm_losses, None))
    assert set(report) == {"lm loss"}
    torch.testing.assert_close(loss, lm)


class _Chunk(torch.nn.Module):
    def __init__(self, pre_process, post_process, every_stage_reads_data=False):
        super().__init__()
        self.pre_process, self.post_process = pre_process, post_process
        self.every_stage_reads_data = every_stage_reads_data


def test_every_chunk_of_an_interleaved_bert_sees_every_micro_batch():
    """Rank 0 of PP2 x VPP2 holds global stages 0 and 2: a GPT reads data on the first only;
    a BERT on both, each chunk through its own view of the one stream (a shared iterator
    would give each chunk every other micro-batch)."""
    from megatron.training.training import iterators_per_chunk

    gpt = iterators_per_chunk(iter(range(4)), [_Chunk(True, False), _Chunk(False, False)])
    assert gpt[1] is None and list(gpt[0]) == [0, 1, 2, 3]
    bert = iterators_per_chunk(iter(range(4)), [_Chunk(True, False, True), _Chunk(False, False, True)])
    assert [next(bert[0]), next(bert[0]), next(bert[1])] == [0, 1, 0]
    assert list(bert[1]) == [1, 2, 3] and list(bert[0]) == [2, 3]
    assert iterators_per_chunk(None, [_Chunk(True, False, True), _Chunk(False, True, True)]) == [None, None]


def test_bert_flops_count_the_full_attention_core_and_the_heads():
    args = Namespace(seq_length=128, num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16,
                     ffn_hidden_size=256, padded_vocab_size=512, group_query_attention=False, swiglu=False,
                     num_experts=None, bert_binary_head=True)
    s, L, h = 128, 2, 64
    # GPT's count halves the attention core (causal); BERT's is bidirectional and adds the
    # LM-head dense layer per token and the pooler + binary head per sequence.
    extra_per_token = 6 * L * h * s + 6 * h * h
    assert bert_floating_point_operations(args, 4) == pytest.approx(
        num_floating_point_operations(args, 4) + 4 * s * extra_per_token + 4 * 6 * (h * h + 2 * h), rel=1e-12)
