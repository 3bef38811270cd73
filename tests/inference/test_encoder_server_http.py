"""A BERT model served over real HTTP: PUT /api scoring, POST /fill-mask and POST
/v1/embeddings against Hugging Face (the model, its tokenizer and its fill-mask pipeline;
embeddings through the real ``openai`` client), sentence pairs through the binary head,
concurrent clients, a headless model, and the bad-input list (each a 4xx naming the field).

The model is a tiny random BertForPreTraining with the real bert-base-uncased vocabulary,
imported through the converter's mapping (fp32)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tests.core.models import bert_cases
from tests.inference.conftest import RunningServer

requests = pytest.importorskip("requests")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MAX_SEQ = 32


def _vocab_file() -> Path:
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "assets" / "tokenizers" / "bert-base-uncased" / "vocab.txt"
        if candidate.is_file():
            return candidate
    pytest.skip("shared/assets/tokenizers/bert-base-uncased not found beside the repository")


def _hf_config(arch):
    return transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=MAX_SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.1, architectures=[arch],
    )


@pytest.fixture(scope="module")
def bert_server():
    torch.manual_seed(0)
    running = _serve(transformers.BertForPreTraining(_hf_config("BertForPreTraining")).float().eval())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def headless_server():
    torch.manual_seed(1)
    running = _serve(transformers.BertModel(_hf_config("BertModel")).float().eval(), pooling="pooler")
    yield running
    running.stop()


def _serve(hf, pooling="mean"):
    from megatron.core.inference.engines.encoder_engine import EncoderEngine
    from megatron.inference.encoder_api import build_encoder_app
    from megatron.inference.encoder_service import EncoderService
    from megatron.inference.text_service import ServingLimits
    from megatron.training.tokenizer.bert_wordpiece import BertWordPieceTokenizer

    vocab = _vocab_file()
    model, _ = bert_cases.megatron_model(hf)
    tokenizer = BertWordPieceTokenizer(str(vocab), lower_case=True)
    engine = EncoderEngine(model, 4, MAX_SEQ, mask_id=tokenizer.mask, pad_id=tokenizer.pad,
                           vocab_size=tokenizer.vocab_size, special_ids=(tokenizer.cls, tokenizer.sep, tokenizer.pad))
    limits = ServingLimits(max_prompts=4, max_sequence_length=MAX_SEQ, max_tokens_to_oom=3 * MAX_SEQ,
                           max_body_bytes=16 * 1024)
    service = EncoderService(engine, tokenizer, limits, model_name="tiny-bert", pooling=pooling)
    running = RunningServer(service, build_encoder_app(service))
    running.hf = hf
    running.hf_tokenizer = transformers.BertTokenizer(vocab=str(vocab), do_lower_case=True)
    return running


def _hf(server, encoding):
    with torch.no_grad():
        out = server.hf(**{k: torch.tensor([v]) for k, v in encoding.items()})
    return torch.log_softmax(out.prediction_logits[0], -1), torch.log_softmax(out.seq_relationship_logits[0], -1)


def test_put_api_scores_like_transformers(bert_server):
    prompts = ["The quick brown fox jumps.", "Paris is the capital of France [SEP] It is a large city."]
    reply = requests.put(bert_server.url + "/api", json={"prompts": prompts, "tokens_to_generate": 0,
                                                         "logprobs": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"text", "segments", "tokens", "logprobs", "sentence_logprobs"}
    assert body["text"] == prompts
    pairs = [("The quick brown fox jumps.",), ("Paris is the capital of France", "It is a large city.")]
    for i, pair in enumerate(pairs):
        encoding = dict(bert_server.hf_tokenizer(*pair))
        assert body["tokens"][i] == encoding["input_ids"]
        token_log_probs, nsp = _hf(bert_server, encoding)
        expected = token_log_probs[torch.arange(len(encoding["input_ids"])), torch.tensor(encoding["input_ids"])]
        torch.testing.assert_close(torch.tensor(body["logprobs"][i]), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(body["sentence_logprobs"][i]), nsp, atol=1e-5, rtol=1e-5)
        assert body["segments"][i][0] == "[CLS]" and body["segments"][i][-1] == "[SEP]"


def test_put_api_pseudo_log_likelihood(bert_server):
    reply = requests.put(bert_server.url + "/api", json={"prompts": ["a short one"], "tokens_to_generate": 0,
                                                         "logprobs": True, "pseudo_log_likelihood": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    encoding = dict(bert_server.hf_tokenizer("a short one"))
    ids = encoding["input_ids"]
    expected = []
    for p in range(1, len(ids) - 1):
        masked = dict(encoding, input_ids=ids[:p] + [bert_server.hf_tokenizer.mask_token_id] + ids[p + 1:])
        expected.append(float(_hf(bert_server, masked)[0][p, ids[p]]))
    pseudo = body["pseudo_logprobs"][0]
    assert pseudo[0] is None and pseudo[-1] is None
    torch.testing.assert_close(torch.tensor(pseudo[1:-1]), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert body["pseudo_log_likelihood"][0] == pytest.approx(sum(expected), abs=1e-4)


def test_fill_mask_equals_the_transformers_pipeline(bert_server):
    masked_lm = transformers.BertForMaskedLM(bert_server.hf.config).eval()
    masked_lm.load_state_dict(bert_server.hf.state_dict(), strict=False)  # the same MLM head (NSP head dropped)
    pipe = transformers.pipeline("fill-mask", model=masked_lm, tokenizer=bert_server.hf_tokenizer, device="cpu")
    text = "The capital of France is [MASK]."
    reply = requests.post(bert_server.url + "/fill-mask", json={"inputs": text, "parameters": {"top_k": 3}},
                          timeout=60)
    assert reply.status_code == 200, reply.text
    expected = pipe(text, top_k=3)
    got = reply.json()
    assert [c["token"] for c in got] == [c["token"] for c in expected]
    for g, e in zip(got, expected):
        assert g["score"] == pytest.approx(e["score"], rel=1e-4, abs=1e-7)
        assert set(g) == {"score", "token", "token_str", "sequence"}
    two = requests.post(bert_server.url + "/fill-mask", json={"inputs": ["[MASK] is [MASK].", text]}, timeout=60)
    assert two.status_code == 200, two.text
    first, second = two.json()
    assert len(first) == 2 and all(len(candidates) == 5 for candidates in first)  # two masks, default top_k 5
    assert [c["token"] for c in second] == [c["token"] for c in pipe(text, top_k=5)]


def test_concurrent_clients_get_their_own_answers(bert_server):
    texts = [f"sentence number {i} is here" for i in range(6)]
    alone = {t: requests.put(bert_server.url + "/api", json={"prompts": [t], "tokens_to_generate": 0, "logprobs": True},
                             timeout=60).json()["logprobs"][0] for t in texts}
    answers, errors = {}, []

    def client(text):
        try:
            reply = requests.put(bert_server.url + "/api", json={"prompts": [text], "tokens_to_generate": 0,
                                                                 "logprobs": True}, timeout=60)
            answers[text] = reply.json()["logprobs"][0]
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for text in texts:
        torch.testing.assert_close(torch.tensor(answers[text]), torch.tensor(alone[text]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("route,body,field,phrase", [
    ("/api", {"prompts": ["hi"], "tokens_to_generate": 5, "logprobs": True}, "tokens_to_generate", "does not generate"),
    ("/api", {"prompts": ["hi"], "tokens_to_generate": 0}, "tokens_to_generate", "logprobs"),
    ("/api", {"prompts": ["hi"], "tokens_to_generate": 0, "logprobs": True, "add_BOS": True}, "add_BOS", "[CLS]"),
    ("/api", {"prompts": [" "], "tokens_to_generate": 0, "logprobs": True}, "prompts", "empty"),
    ("/api", {"prompts": "hi", "tokens_to_generate": 0, "logprobs": True}, "prompts", "list of strings"),
    ("/api", {"prompts": ["word " * 40], "tokens_to_generate": 0, "logprobs": True}, "prompts", "positions"),
    ("/api", {"prompts": ["a"] * 5, "tokens_to_generate": 0, "logprobs": True}, "prompts", "maximum of 4"),
    ("/api", {"prompts": ["a b c d e f g h i j k l m n o p q r s t u v w x y z"], "tokens_to_generate": 0,
              "logprobs": True, "pseudo_log_likelihood": True}, "prompts", "max-tokens-to-oom"),
    ("/api", {"prompts": ["hi"], "tokens_to_generate": 0, "logprobs": True, "beam": 2}, "beam", "unknown"),
    ("/api", {"prompts": ["hi"], "tokens_to_generate": 0, "logprobs": True, "pseudo_log_likelihood": 1},
     "pseudo_log_likelihood", "boolean"),
    ("/fill-mask", {"inputs": "no mask here"}, "inputs", "no [MASK]"),
    ("/fill-mask", {"inputs": []}, "inputs", "non-empty list"),
    ("/fill-mask", {"text": "a [MASK]"}, "text", "unknown"),
    ("/fill-mask", {"inputs": "a [MASK]", "parameters": {"top_k": 0}}, "top_k", "between 1 and 100"),
    ("/fill-mask", {"inputs": "a [MASK]", "parameters": {"targets": ["x"]}}, "targets", "unknown"),
    ("/fill-mask", {"inputs": "a [MASK]", "parameters": 3}, "parameters", "object"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3}, None, "does not generate text"),
    ("/v1/chat/completions", {"messages": []}, None, "does not generate text"),
])
def test_bad_input_is_a_400_naming_the_field(bert_server, route, body, field, phrase):
    send = requests.put if route == "/api" else requests.post
    reply = send(bert_server.url + route, json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()
    assert error["error"]["param"] == field
    assert phrase in error["message"]


def test_malformed_and_oversized_bodies_and_health(bert_server):
    bad = requests.put(bert_server.url + "/api", data=b"{not json", timeout=60)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["message"]
    big = requests.post(bert_server.url + "/fill-mask", data=b"x" * (32 * 1024), timeout=60)
    assert big.status_code == 413
    assert requests.get(bert_server.url + "/health", timeout=10).json()["status"] == "ok"
    assert [m["id"] for m in requests.get(bert_server.url + "/v1/models", timeout=10).json()["data"]] == ["tiny-bert"]


def _hf_mean_embedding(server, text):
    encoding = server.hf_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = server.hf.bert(**encoding).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=-1)


def test_embeddings_through_the_openai_client(bert_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=bert_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = ["The quick brown fox jumps.", "A second, longer sentence about something else entirely."]
    reply = client.embeddings.create(model="tiny-bert", input=texts)  # the client asks for base64
    assert [d.index for d in reply.data] == [0, 1] and reply.model == "tiny-bert"
    for text, item in zip(texts, reply.data):
        torch.testing.assert_close(torch.tensor(item.embedding), _hf_mean_embedding(bert_server, text),
                                   atol=1e-5, rtol=1e-5)
    ids = bert_server.hf_tokenizer(texts[0])["input_ids"]
    assert reply.usage.prompt_tokens == len(ids) + len(bert_server.hf_tokenizer(texts[1])["input_ids"])
    as_floats = requests.post(bert_server.url + "/v1/embeddings", json={"input": ids[1:-1], "encoding_format": "float"},
                              timeout=60).json()
    torch.testing.assert_close(torch.tensor(as_floats["data"][0]["embedding"]), torch.tensor(reply.data[0].embedding),
                               atol=1e-6, rtol=1e-6)  # token ids are framed with [CLS] / [SEP] as text is


@pytest.mark.parametrize("body,field,phrase", [
    ({"input": ""}, "input", "empty"),
    ({"input": 3}, "input", "a string, a list of strings"),
    ({"input": [[101, 99999999]]}, "input", "outside the vocabulary"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": "hi", "dimensions": 8}, "dimensions", "32 dimensions"),
    ({"input": ["a"] * 5}, "input", "maximum of 4"),
    ({"text": "hi"}, "text", "unknown"),
])
def test_bad_embedding_requests_are_a_400_naming_the_field(bert_server, body, field, phrase):
    reply = requests.post(bert_server.url + "/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field and phrase in reply.json()["message"]


def test_a_headless_model_serves_embeddings_only(headless_server):
    reply = requests.post(headless_server.url + "/v1/embeddings", json={"input": "hello there",
                                                                         "encoding_format": "float"}, timeout=60)
    assert reply.status_code == 200, reply.text
    encoding = headless_server.hf_tokenizer("hello there", return_tensors="pt")
    with torch.no_grad():
        pooled = headless_server.hf(**encoding).pooler_output[0]
    torch.testing.assert_close(torch.tensor(reply.json()["data"][0]["embedding"]),
                               torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-5)
    for send, route, body in ((requests.put, "/api", {"prompts": ["hi"], "tokens_to_generate": 0, "logprobs": True}),
                              (requests.post, "/fill-mask", {"inputs": "a [MASK]"})):
        refused = send(headless_server.url + route, json=body, timeout=60)
        assert refused.status_code == 400 and "no LM head" in refused.json()["message"]
