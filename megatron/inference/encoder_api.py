"""The routes of a served BERT model: scoring, fill-mask and embeddings, never generation.

- ``PUT /api``: Megatron's request with ``tokens_to_generate: 0`` and ``logprobs: true``
  (the score-only request of the generation server). The reply has Megatron's ``text``,
  ``segments``, ``tokens`` and ``logprobs`` (one per token, ``[CLS]`` and ``[SEP]``
  included: log p(token) from the MLM head over the sequence as given), plus
  ``sentence_logprobs`` where the model has a binary head. ``pseudo_log_likelihood: true``
  adds ``pseudo_logprobs`` (each token scored with only itself masked; null at ``[CLS]`` /
  ``[SEP]``) and their sum per prompt, ``pseudo_log_likelihood``.
- ``POST /fill-mask``: the Hugging Face Inference API's fill-mask request,
  ``{"inputs": str | [str], "parameters": {"top_k": 5}}``; per ``[MASK]``, the ``top_k``
  candidates as ``{"score", "token", "token_str", "sequence"}`` (score: probability).
  One input with one mask gives a list of candidates; several masks a list per mask; a
  list of inputs a list of those.
- ``POST /v1/embeddings``: OpenAI's embeddings request (``input``: a string, a list of
  strings, a list of token ids or a list of such lists; ``encoding_format`` "float" or
  "base64"); one vector per input, pooled as the server's --embedding-pooling says. Token
  ids are framed with ``[CLS]`` / ``[SEP]`` where they lack them.
- A headless ``BertModel`` (no LM head) serves embeddings only: scoring and fill-mask
  answer 400.
- The generation routes answer 400 saying what this model does instead.
"""

from __future__ import annotations

import base64
import math
from typing import List

import numpy as np

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from megatron.core.inference.engines.encoder_engine import MaskedLMRequest, MaskedLMResult
from megatron.inference import megatron_api
from megatron.inference.app import base_app, read_json
from megatron.inference.errors import RequestError
from megatron.inference.encoder_service import EncoderService
from megatron.inference.request_fields import check_known_fields, get_bool, get_int

API_FIELDS = megatron_api.KNOWN + ("pseudo_log_likelihood",)
EMBEDDING_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
FILL_MASK_FIELDS = ("inputs", "parameters", "options")
MAX_TOP_K = 100


def _fields(body, known, route: str, required: str, example: str) -> None:
    """RequestError unless ``body`` is a JSON object of ``known`` fields holding ``required``."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_known_fields(body, known, route)
    if required not in body:
        raise RequestError(f"{required} is not in the request: send {example}", field=required)


def _needs_lm_head(service: EncoderService, route: str) -> None:
    if not service.engine.has_lm_head:
        raise RequestError(f"{route}: this BERT model has no LM head (a headless BertModel, e.g. a sentence-embedding "
                           "model): it serves POST /v1/embeddings only")


def parse_api_request(body, service: EncoderService) -> List[MaskedLMRequest]:
    """The scoring requests of a PUT /api body; RequestError on any mistake."""
    _needs_lm_head(service, "PUT /api")
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, message in megatron_api.REJECTED.items():
        if key in body:
            raise RequestError(message, field=key)
    check_known_fields(body, API_FIELDS, "PUT /api")
    prompts = megatron_api.read_prompts(body)
    if get_int(body, "tokens_to_generate", 64, low=0) != 0:
        raise RequestError("this server serves a BERT model, which scores text but does not generate it: send "
                           "tokens_to_generate 0 with logprobs true (or POST /fill-mask to fill [MASK] tokens)",
                           field="tokens_to_generate")
    megatron_api.sampling_params(body)  # the remaining fields are validated as the generation server does
    if get_bool(body, "add_BOS", False):
        raise RequestError("add_BOS does not apply to a BERT model: every prompt is framed as [CLS] ... [SEP]",
                           field="add_BOS")
    pseudo = get_bool(body, "pseudo_log_likelihood", False)
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise RequestError(f"prompts[{i}] is empty: send text to score", field="prompts")
    requests = []
    for text in prompts:
        tokens, types = service.encode(text)
        requests.append(MaskedLMRequest(tokens, types, pseudo_log_likelihood=pseudo))
    service.check(requests, "prompts")
    return requests


def api_response(prompts: List[str], results: List[MaskedLMResult], service: EncoderService) -> dict:
    reply = {
        "text": list(prompts),
        "segments": [[service.detokenize([t]) for t in r.tokens] for r in results],
        "tokens": [r.tokens for r in results],
        "logprobs": [r.log_probs for r in results],
    }
    if service.engine.has_binary_head:
        reply["sentence_logprobs"] = [r.sentence_log_probs for r in results]
    if results and results[0].pseudo_log_probs is not None:
        reply["pseudo_logprobs"] = [r.pseudo_log_probs for r in results]
        reply["pseudo_log_likelihood"] = [r.pseudo_log_likelihood for r in results]
    return reply


def parse_fill_mask(body, service: EncoderService):
    """(requests, inputs as a list, whether ``inputs`` was one string) of a /fill-mask body."""
    _needs_lm_head(service, "POST /fill-mask")
    _fields(body, FILL_MASK_FIELDS, "POST /fill-mask", "inputs", '{"inputs": "text with [MASK]"}')
    inputs = body["inputs"]
    single = isinstance(inputs, str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("inputs must be a string or a non-empty list of strings", field="inputs")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("parameters must be an object, e.g. {\"top_k\": 5}", field="parameters")
    check_known_fields(parameters, ("top_k",), "POST /fill-mask parameters")
    top_k = get_int(parameters, "top_k", 5, low=1, high=MAX_TOP_K)
    requests = []
    for i, text in enumerate(texts):
        tokens, types = service.encode(text)
        if service.mask not in tokens:
            mask_text = service.detokenize([service.mask])
            raise RequestError(f"inputs[{i}] has no {mask_text} token to fill", field="inputs")
        requests.append(MaskedLMRequest(tokens, types, top_k=top_k))
    service.check(requests, "inputs")
    return requests, texts, single


def _filled(service: EncoderService, result: MaskedLMResult) -> list:
    """Hugging Face's fill-mask answer for one input: candidates per mask, in order."""
    per_mask = []
    for position in sorted(result.mask_predictions):
        candidates = []
        for token, log_prob in result.mask_predictions[position]:
            filled = list(result.tokens)
            filled[position] = token
            candidates.append({"score": math.exp(log_prob), "token": token,
                               "token_str": service.detokenize([token]),
                               "sequence": service.detokenize(service.without_specials(filled))})
        per_mask.append(candidates)
    return per_mask[0] if len(per_mask) == 1 else per_mask


def _is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def parse_embeddings(body, service: EncoderService) -> List[MaskedLMRequest]:
    """The requests of a POST /v1/embeddings body; RequestError on any mistake."""
    _fields(body, EMBEDDING_FIELDS, "POST /v1/embeddings", "input", '{"input": "text"}')
    value = body["input"]
    if isinstance(value, str) or _is_token_list(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or _is_token_list(v) for v in value):
        items = value
    else:
        raise RequestError("input must be a string, a list of strings, a list of token ids or a list of such lists",
                           field="input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError(f"encoding_format must be \"float\" or \"base64\", got {encoding!r}", field="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != service.engine.hidden_size:
        raise RequestError(f"dimensions: this model's embeddings have {service.engine.hidden_size} dimensions and are "
                           "not shortened; drop the field", field="dimensions")
    requests = []
    vocab = service.engine.vocab_size
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item.strip():
                raise RequestError(f"input[{i}] is empty: send text to embed", field="input")
            tokens, types = service.encode(item)
        else:
            bad = [t for t in item if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise RequestError(f"input[{i}] holds token id {bad[0]}, outside the vocabulary of {vocab}",
                                   field="input")
            tokens, types = service.frame(item)
        requests.append(MaskedLMRequest(tokens, types))
    service.check(requests, "input")
    return requests


def embeddings_response(requests: List[MaskedLMRequest], vectors: List[List[float]], encoding: str, model: str) -> dict:
    data = []
    for index, vector in enumerate(vectors):
        if encoding == "base64":  # little-endian float32, as OpenAI's clients decode it
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(r.tokens) for r in requests)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def generation_refused(route: str) -> RequestError:
    return RequestError(f"{route}: this server serves a BERT model, which does not generate text; use PUT /api with "
                        "tokens_to_generate 0 and logprobs true to score text, POST /fill-mask, or POST /v1/embeddings",
                        field=None)


def build_encoder_app(service: EncoderService) -> FastAPI:
    app = base_app(service)
    limit = service.limits.max_body_bytes

    @app.put("/api")
    async def api(request: Request):
        body = await read_json(request, limit)
        requests = parse_api_request(body, service)
        results = await run_in_threadpool(service.score, requests)
        return api_response(body["prompts"], results, service)

    @app.post("/fill-mask")
    async def fill_mask(request: Request):
        body = await read_json(request, limit)
        requests, _texts, single = parse_fill_mask(body, service)
        results = await run_in_threadpool(service.score, requests)
        answers = [_filled(service, r) for r in results]
        return answers[0] if single else answers

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_json(request, limit)
        requests = parse_embeddings(body, service)
        vectors = await run_in_threadpool(service.embed, requests)
        return embeddings_response(requests, vectors, body.get("encoding_format", "float"),
                                   body.get("model") or service.model_name)

    def refuse(route: str):
        async def handler(_request: Request):
            raise generation_refused(route)
        return handler

    for route in ("/completions", "/v1/completions", "/chat/completions", "/v1/chat/completions"):
        app.add_api_route(route, refuse(f"POST {route}"), methods=["POST"])
    return app
