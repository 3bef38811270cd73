"""Tensor- and pipeline-parallel BERT scoring and embeddings (2 ranks, gloo) equals one process, with
Megatron's rank roles: rank 0 runs the requests through the service and broadcasts each
batch; rank 1 follows until rank 0 says exit.

Every layout builds the same full weights (layout-independent per-layer seeds); ranks keep
their shards or stages. Log-probs and embeddings agree to 1e-5 and the fill-mask candidates
are the same."""

import torch

from megatron.core import parallel_state
from megatron.core.inference.engines.encoder_engine import EncoderEngine, MaskedLMRequest
from megatron.core.models.bert import BertModel
from megatron.core.transformer.init_rng import layout_independent_initialization
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.multirank import run_on_ranks

SEED, VOCAB, SEQ = 4321, 96, 24
CLS, SEP, MASK, PAD = 1, 2, 3, 0


class _Tokenizer:
    """Just the special ids the service reads."""

    cls, sep, mask, pad = CLS, SEP, MASK, PAD


def _model(tp: int = 1, pp: int = 1, pp_rank: int = 0) -> BertModel:
    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.1,
    )
    with layout_independent_initialization(SEED):
        return BertModel(config, num_tokentypes=2, vocab_size=VOCAB, max_sequence_length=SEQ,
                         share_embeddings_and_output_weights=False, pre_process=pp_rank == 0,
                         post_process=pp_rank == pp - 1).eval()


def _engine(model) -> EncoderEngine:
    return EncoderEngine(model, 3, SEQ, mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, special_ids=(CLS, SEP, PAD))


def _requests():
    gen = torch.Generator().manual_seed(7)
    out = []
    for n in (6, 11, 8):
        tokens = [CLS] + torch.randint(4, VOCAB, (n - 2,), generator=gen).tolist() + [SEP]
        tokens[2] = MASK
        out.append(MaskedLMRequest(tokens, [0] * (n // 2) + [1] * (n - n // 2), top_k=3,
                                   pseudo_log_likelihood=n == 6))
    return out


def _serve_on_ranks(rank, world_size, tp, pp):
    from megatron.inference.encoder_service import EncoderService
    from megatron.inference.rank_roles import Leader, follow
    from megatron.inference.text_service import ServingLimits

    groups = parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    engine = _engine(_model(tp, pp, groups.rank("pp")))
    if rank != 0:
        follow(engine)
        return None
    service = EncoderService(engine, _Tokenizer(), ServingLimits(), leader=Leader(), pooling="pooler", normalize=False)
    try:
        return service.score(_requests()) + service.score(_requests()[1:2]), service.embed(_requests())
    finally:
        service.leader.shutdown()


def _check(tp: int, pp: int):
    expected_engine = _engine(_model())
    expected = expected_engine.score(_requests()) + expected_engine.score(_requests()[1:2])
    got, embeddings = run_on_ranks(_serve_on_ranks, world_size=2, args=(tp, pp), timeout=240)[0]
    torch.testing.assert_close(torch.tensor(embeddings),
                               torch.tensor(expected_engine.embed(_requests(), pooling="pooler", normalize=False)),
                               atol=1e-5, rtol=1e-5)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.tensor(g.log_probs), torch.tensor(e.log_probs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(g.sentence_log_probs), torch.tensor(e.sentence_log_probs),
                                   atol=1e-5, rtol=1e-5)
        assert {p: [t for t, _ in c] for p, c in g.mask_predictions.items()} == \
               {p: [t for t, _ in c] for p, c in e.mask_predictions.items()}
        assert (g.pseudo_log_likelihood is None) == (e.pseudo_log_likelihood is None)
        if e.pseudo_log_likelihood is not None:
            assert abs(g.pseudo_log_likelihood - e.pseudo_log_likelihood) < 1e-4


def test_tensor_parallel_scoring_equals_one_process():
    _check(tp=2, pp=1)


def test_pipeline_parallel_scoring_equals_one_process():
    _check(tp=1, pp=2)
