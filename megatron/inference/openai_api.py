"""OpenAI-compatible completions and chat completions: request rules and reply bodies.

``POST /v1/completions`` and ``POST /completions`` (Megatron's route: the same fields,
but ``max_tokens`` is required) take ``prompt`` as a string, a list of strings, a list of
token ids or a list of lists of ids. ``POST /v1/chat/completions`` builds the prompt with
the tokenizer's chat template. ``top_k`` is accepted as an extension; ``n`` and
``best_of`` must be 1; penalties and ``logit_bias`` are refused when they would change the
result. ``logprobs`` (completions: an integer N up to 5) returns the chosen tokens' log-probs
and, per position, the N most likely tokens with the chosen one (``top_logprobs``, as
OpenAI and the evaluation harnesses that read it expect); chat takes ``logprobs: true`` and
``top_logprobs`` up to 20. Streamed chunks carry no log-probs.
Generation stops at the tokenizer's end-of-document token (not part of the text) or at a
``stop`` string (cut from the text).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import List

from megatron.core.inference import GenerationResult, InferenceRequest, SamplingParams
from megatron.core.inference.sampling_params import MAX_TOP_LOGPROBS
from megatron.inference.errors import RequestError
from megatron.inference.request_fields import check_known_fields, get_bool, get_float, get_int, get_stop
from megatron.inference.streaming import TextStream

_COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
           "presence_penalty", "frequency_penalty", "logit_bias", "user")
COMPLETION_FIELDS = _COMMON + ("prompt", "logprobs", "echo", "best_of", "suffix")
CHAT_FIELDS = _COMMON + ("messages", "logprobs", "top_logprobs", "max_completion_tokens")


@dataclasses.dataclass
class ParsedRequest:
    """A validated completions / chat request."""

    requests: List[InferenceRequest]
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: bool
    stop_strings: List[str]
    stop_token_ids: List[int]


def _unsupported(body: dict) -> None:
    for name in ("n", "best_of"):
        if get_int(body, name, 1) != 1:
            raise RequestError(f"{name} must be 1: one completion per prompt is supported", field=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if get_float(body, name, 0.0) != 0.0:
            raise RequestError(f"{name} is not supported: leave it at 0", field=name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported", field="logit_bias")
    if body.get("suffix") is not None:
        raise RequestError("suffix (insertion) is not supported", field="suffix")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("user must be a string", field="user")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise RequestError("model must be a string", field="model")


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("stream_options must be an object with at most include_usage", field="stream_options")
    return get_bool(options, "include_usage", False)


def _sampling(body: dict, max_tokens: int, logprobs: bool, stops: List[str], stop_ids: List[int],
              top_logprobs: int = 0) -> SamplingParams:
    temperature = get_float(body, "temperature", 1.0, low=0.0, high=100.0)
    top_p = get_float(body, "top_p", 1.0, low=0.0, high=1.0)
    top_k = get_int(body, "top_k", 0, low=0)
    seed = get_int(body, "seed", None)
    if temperature == 0.0:  # greedy, as Megatron's /completions defines it
        top_k, top_p = 1, 0.0
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, return_log_probs=logprobs,
                          num_tokens_to_generate=max_tokens, random_seed=seed, stop_token_ids=tuple(stop_ids),
                          stop_strings=tuple(stops), top_logprobs=top_logprobs)


def _prompt_tokens(body: dict, service) -> List[List[int]]:
    if "prompt" not in body:
        raise RequestError("prompt is required", field="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt must be a non-empty string, list of strings, list of token ids or list of lists "
                           "of token ids", field="prompt")
    vocab = service.engine.vocab_size
    tokens = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            tokens.append(service.tokenize(item))
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if vocab is not None and any(t < 0 or t >= vocab for t in item):
                raise RequestError(f"prompt[{i}] has token ids outside the vocabulary [0, {vocab})", field="prompt")
            tokens.append(list(item))
        else:
            raise RequestError(f"prompt[{i}] must be a string or a list of token ids", field="prompt")
    return tokens


def parse_completion(body, service, max_tokens_required: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_known_fields(body, COMPLETION_FIELDS, "completions")
    _unsupported(body)
    if max_tokens_required and "max_tokens" not in body:
        raise RequestError("max_tokens is required", field="max_tokens")
    max_tokens = get_int(body, "max_tokens", 16, low=0)
    echo = get_bool(body, "echo", False)
    logprobs = get_int(body, "logprobs", None, low=0, high=5)
    stream = get_bool(body, "stream", False)
    if max_tokens == 0 and not echo:
        raise RequestError("max_tokens=0 only scores the prompt: set echo=true to get it back", field="echo")
    stops = get_stop(body)
    stop_ids = [service.eod] if service.eod is not None else []
    params = _sampling(body, max_tokens, logprobs is not None, stops, stop_ids, top_logprobs=logprobs or 0)
    tokens = _prompt_tokens(body, service)
    service.check(tokens, [max_tokens] * len(tokens), "prompt", "max_tokens")
    return ParsedRequest([InferenceRequest(t, params) for t in tokens], stream, _stream_options(body), echo,
                         logprobs is not None, stops, stop_ids)


def _messages(body: dict) -> List[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", field="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role", field="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"messages[{i}].content parts must all be {{type: text, text}}", field="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", field="messages")
        out.append({"role": message["role"], "content": content})
    return out


def parse_chat(body, service) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_known_fields(body, CHAT_FIELDS, "chat completions")
    _unsupported(body)
    messages = _messages(body)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    default = service.limits.max_sequence_length
    max_tokens = get_int(body, field, None, low=1)
    logprobs = get_bool(body, "logprobs", False)
    top_logprobs = get_int(body, "top_logprobs", 0, low=0, high=MAX_TOP_LOGPROBS) or 0
    if top_logprobs and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", field="top_logprobs")
    stream = get_bool(body, "stream", False)
    stops = get_stop(body)
    stop_ids = [service.eod] if service.eod is not None else []
    tokens = service.chat_prompt(messages)
    if max_tokens is None:  # as many as the context leaves
        max_tokens = max(1, min(default, service.engine.max_sequence_length) - len(tokens))
    params = _sampling(body, max_tokens, logprobs, stops, stop_ids, top_logprobs=top_logprobs)
    service.check([tokens], [max_tokens], "messages", field)
    return ParsedRequest([InferenceRequest(tokens, params)], stream, _stream_options(body), False, logprobs, stops,
                         stop_ids)


def new_stream(service, parsed: ParsedRequest, prompt: List[int]) -> TextStream:
    return TextStream(lambda ids: service.continuation_text(prompt, ids), parsed.stop_strings, parsed.stop_token_ids)


def finish_reason(result: GenerationResult, stream: TextStream) -> str:
    return "stop" if result.finish_reason == "stop" or stream.stopped else "length"


def usage(results: List[GenerationResult]) -> dict:
    prompt = sum(len(r.prompt_tokens) for r in results)
    completion = sum(len(r.generated_tokens) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _alternatives(top, count: int) -> list:
    """Each position's alternatives, or none per position when they were not asked for."""
    return list(top) if top is not None else [[] for _ in range(count)]


def _top_entry(service, token: int, log_prob: float, alternatives) -> dict:
    """OpenAI's completions entry: {token text: log-prob} of the best alternatives, best
    first, and always the chosen token."""
    entry = {}
    for alternative, value in alternatives:
        entry.setdefault(service.detokenize([alternative]), value)
    entry.setdefault(service.detokenize([token]), log_prob)
    return entry


def _completion_logprobs(service, result: GenerationResult, echo: bool, kept: int) -> dict:
    generated = result.generated_tokens[:kept]
    tokens = (result.prompt_tokens if echo else []) + generated
    values = ([None] + list(result.prompt_log_probs) if echo else []) + list(result.generated_log_probs[:kept])
    top = [_top_entry(service, t, lp, alt) for t, lp, alt in zip(
        generated, result.generated_log_probs, _alternatives(result.generated_top_log_probs, len(generated)))]
    if echo:
        prompt_top = [_top_entry(service, t, lp, alt) for t, lp, alt in zip(
            result.prompt_tokens[1:], result.prompt_log_probs,
            _alternatives(result.prompt_top_log_probs, len(result.prompt_log_probs)))]
        top = [None] + prompt_top + top
    pieces = [service.detokenize([t]) for t in tokens]
    offsets, position = [], 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    return {"tokens": pieces, "token_logprobs": values, "text_offset": offsets, "top_logprobs": top}


def _kept_tokens(result: GenerationResult, stream: TextStream, parsed: ParsedRequest) -> int:
    """Generated tokens that made it into the text (a final stop token does not)."""
    generated = result.generated_tokens
    if generated and generated[-1] in parsed.stop_token_ids:
        return len(generated) - 1
    return len(generated)


def completion_response(service, parsed: ParsedRequest, results: List[GenerationResult], model: str) -> dict:
    choices = []
    for index, result in enumerate(results):
        stream = new_stream(service, parsed, result.prompt_tokens)
        for token in result.generated_tokens:
            stream.add(token)
        text = (service.detokenize(result.prompt_tokens) if parsed.echo else "") + stream.text
        logprobs = None
        if parsed.logprobs:
            logprobs = _completion_logprobs(service, result, parsed.echo, _kept_tokens(result, stream, parsed))
        choices.append({"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": finish_reason(result, stream)})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(results)}


def _chat_token(service, token: int, log_prob: float) -> dict:
    text = service.detokenize([token])
    return {"token": text, "logprob": log_prob, "bytes": list(text.encode("utf-8"))}


def chat_response(service, parsed: ParsedRequest, results: List[GenerationResult], model: str) -> dict:
    result = results[0]
    stream = new_stream(service, parsed, result.prompt_tokens)
    for token in result.generated_tokens:
        stream.add(token)
    logprobs = None
    if parsed.logprobs:
        kept = _kept_tokens(result, stream, parsed)
        generated = result.generated_tokens[:kept]
        logprobs = {"content": [
            dict(_chat_token(service, t, lp), top_logprobs=[_chat_token(service, a, v) for a, v in alternatives])
            for t, lp, alternatives in zip(generated, result.generated_log_probs,
                                           _alternatives(result.generated_top_log_probs, len(generated)))
        ]}
    choice = {"index": 0, "message": {"role": "assistant", "content": stream.text}, "logprobs": logprobs,
              "finish_reason": finish_reason(result, stream)}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(results)}
