"""Masked-LM scoring (BERT) against Hugging Face: per-token log-probs, fill-mask top-k,
pseudo-log-likelihood and the binary head, with prompts of mixed lengths batched together.

The models are tiny random BERTs imported from transformers through the converter's
mapping (fp32); every value must equal transformers' within 1e-5."""

import pytest
import torch

from megatron.core.inference.engines.encoder_engine import EncoderEngine, MaskedLMRequest
from tests.core.models import bert_cases

transformers = pytest.importorskip("transformers")

MASK, CLS, SEP, PAD = 3, 1, 2, 0


def _requests(top_k=0, pseudo=False):
    gen = torch.Generator().manual_seed(5)
    out = []
    for n, mask_positions in ((9, (2, 5)), (4, (1,)), (14, ())):
        body = torch.randint(4, bert_cases.VOCAB, (n - 2,), generator=gen).tolist()
        tokens = [CLS] + body + [SEP]
        for p in mask_positions:
            tokens[p] = MASK
        types = [0] * (n // 2) + [1] * (n - n // 2)
        out.append(MaskedLMRequest(tokens, types, top_k=top_k, pseudo_log_likelihood=pseudo))
    return out


def _hf_log_probs(hf, tokens, types):
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=torch.tensor([types]), attention_mask=torch.ones_like(ids))
    logits = out.logits if hasattr(out, "logits") else out.prediction_logits
    nsp = getattr(out, "seq_relationship_logits", None)
    return torch.log_softmax(logits[0], -1), None if nsp is None else torch.log_softmax(nsp[0], -1)


@pytest.fixture(scope="module")
def mlm():
    hf = bert_cases.hf_model("BertForMaskedLM")
    model, _ = bert_cases.megatron_model(hf)
    return hf, model


@pytest.fixture(scope="module")
def pretraining():
    hf = bert_cases.hf_model("BertForPreTraining", seed=2)
    model, _ = bert_cases.megatron_model(hf)
    return hf, model


def _engine(model, batch=8):
    return EncoderEngine(model, batch, bert_cases.SEQ, mask_id=MASK, pad_id=PAD, vocab_size=bert_cases.VOCAB,
                          special_ids=(CLS, SEP, PAD))


def test_token_log_probs_and_fill_mask_equal_transformers_in_a_mixed_length_batch(mlm):
    hf, model = mlm
    requests = _requests(top_k=4)
    results = _engine(model).score(requests)
    for request, result in zip(requests, results):
        expected, _ = _hf_log_probs(hf, request.tokens, request.token_types)
        positions = torch.arange(len(request.tokens))
        torch.testing.assert_close(torch.tensor(result.log_probs), expected[positions, torch.tensor(request.tokens)],
                                   atol=1e-5, rtol=1e-5)
        masks = [p for p, t in enumerate(request.tokens) if t == MASK]
        assert sorted(result.mask_predictions) == masks
        for p in masks:
            values, ids = expected[p].topk(4)
            assert [t for t, _ in result.mask_predictions[p]] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in result.mask_predictions[p]]), values,
                                       atol=1e-5, rtol=1e-5)
        assert result.sentence_log_probs is None and result.pseudo_log_probs is None


def test_a_batch_equals_each_request_alone(mlm):
    _, model = mlm
    requests = _requests(top_k=3, pseudo=True)
    together = _engine(model, batch=5).score(requests)
    for request, result in zip(requests, together):
        alone = _engine(model, batch=1).score([request])[0]
        torch.testing.assert_close(torch.tensor(result.log_probs), torch.tensor(alone.log_probs), atol=1e-5, rtol=1e-5)
        assert result.pseudo_log_likelihood == pytest.approx(alone.pseudo_log_likelihood, abs=1e-4)
        assert result.mask_predictions.keys() == alone.mask_predictions.keys()


def test_pseudo_log_likelihood_masks_one_position_at_a_time(mlm):
    hf, model = mlm
    requests = _requests(pseudo=True)
    results = _engine(model, batch=6).score(requests)
    for request, result in zip(requests, results):
        expected = []
        for p, token in enumerate(request.tokens):
            if token in (CLS, SEP, PAD):
                expected.append(None)
                continue
            masked = list(request.tokens)
            masked[p] = MASK
            log_probs, _ = _hf_log_probs(hf, masked, request.token_types)
            expected.append(float(log_probs[p, token]))
        assert [v is None for v in result.pseudo_log_probs] == [v is None for v in expected]
        got = [v for v in result.pseudo_log_probs if v is not None]
        want = [v for v in expected if v is not None]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
        assert result.pseudo_log_likelihood == pytest.approx(sum(want), abs=1e-4)


def test_binary_head_log_probs_equal_transformers_next_sentence_head(pretraining):
    hf, model = pretraining
    requests = _requests()
    results = _engine(model).score(requests)
    for request, result in zip(requests, results):
        expected_tokens, expected_nsp = _hf_log_probs(hf, request.tokens, request.token_types)
        torch.testing.assert_close(torch.tensor(result.sentence_log_probs), expected_nsp, atol=1e-5, rtol=1e-5)
        positions = torch.arange(len(request.tokens))
        torch.testing.assert_close(torch.tensor(result.log_probs),
                                   expected_tokens[positions, torch.tensor(request.tokens)], atol=1e-5, rtol=1e-5)


def test_token_types_reach_the_model(pretraining):
    _, model = pretraining
    request = _requests()[0]
    zeros = MaskedLMRequest(request.tokens, [0] * len(request.tokens))
    a, b = _engine(model).score([request, zeros])
    assert max(abs(x - y) for x, y in zip(a.log_probs, b.log_probs)) > 1e-3


def test_bad_requests_are_refused(mlm):
    _, model = mlm
    with pytest.raises(ValueError, match="at least one token"):
        MaskedLMRequest([])
    with pytest.raises(ValueError, match="token_types has 2 entries for 3 tokens"):
        MaskedLMRequest([1, 2, 3], [0, 0])
    with pytest.raises(ValueError, match="more than the maximum sequence length"):
        _engine(model).score([MaskedLMRequest([CLS] + [5] * bert_cases.SEQ + [SEP])])


@pytest.fixture(scope="module")
def headless():
    hf = bert_cases.hf_model("BertModel", seed=3)
    model, _ = bert_cases.megatron_model(hf)
    return hf, model


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embeddings_equal_transformers_pooled_hidden_states(headless, pooling, normalize):
    hf, model = headless
    requests = _requests()
    vectors = _engine(model, batch=2).embed(requests, pooling=pooling, normalize=normalize)
    for request, vector in zip(requests, vectors):
        ids = torch.tensor([request.tokens])
        with torch.no_grad():
            out = hf(input_ids=ids, token_type_ids=torch.tensor([request.token_types]),
                     attention_mask=torch.ones_like(ids))
        expected = {"mean": out.last_hidden_state[0].mean(0), "cls": out.last_hidden_state[0, 0],
                    "pooler": out.pooler_output[0]}[pooling]
        if normalize:
            expected = torch.nn.functional.normalize(expected, dim=-1)
        torch.testing.assert_close(torch.tensor(vector), expected, atol=1e-5, rtol=1e-5)


def test_a_headless_model_embeds_but_does_not_score(headless, mlm):
    _, model = headless
    with pytest.raises(ValueError, match="no LM head"):
        _engine(model).score(_requests())
    with pytest.raises(ValueError, match="pooling must be one of"):
        _engine(model).embed(_requests(), pooling="max")
    with pytest.raises(ValueError, match="needs a BertModel with a pooler"):
        _engine(mlm[1]).embed(_requests(), pooling="pooler")


def test_a_model_in_training_mode_is_run_without_dropout_and_left_as_it_was():
    hf = bert_cases.hf_model("BertForPreTraining", seed=4)
    model, _ = bert_cases.megatron_model(hf, config_overrides=dict(hidden_dropout=0.5, attention_dropout=0.5))
    engine = _engine(model)
    expected = engine.score(_requests(top_k=2))
    model.train()
    again = engine.score(_requests(top_k=2))
    assert model.training
    for a, b in zip(again, expected):
        assert a.log_probs == b.log_probs and a.sentence_log_probs == b.sentence_log_probs
    assert engine.embed(_requests(), pooling="pooler") == _engine(model.eval()).embed(_requests(), pooling="pooler")
