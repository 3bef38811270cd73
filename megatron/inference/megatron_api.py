"""Megatron's ``PUT /api`` request rules and reply (megatron-facts 8.2).

Accepted for compatibility but ignored: ``top_p_decay``, ``top_p_bound``,
``prevent_newline_after_colon``, ``stop_token``, ``length_penalty`` (validated, as
Megatron does). Acted on: ``prompts``, ``tokens_to_generate``, ``logprobs``,
``temperature``, ``top_k``, ``top_p``, ``random_seed`` (reproducible sampling),
``add_BOS``, ``stop_on_eol`` / ``stop_on_double_eol`` (stop after a newline / blank line).
Every mistake is HTTP 400 with a JSON message naming the field (Megatron answers some
with a plain string and HTTP 200).
"""

from __future__ import annotations

from typing import List, Tuple

from megatron.core.inference import GenerationResult, InferenceRequest, SamplingParams
from megatron.inference.errors import RequestError
from megatron.inference.request_fields import check_known_fields, get_bool, get_float, get_int

REJECTED = {
    "max_len": "max_len is no longer supported: use tokens_to_generate",
    "sentences": "sentences is no longer supported: use prompts",
    "beam_width": "Beam search is no longer supported: drop beam_width",
}
KNOWN = (
    "prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p", "top_p_decay", "top_p_bound",
    "add_BOS", "stop_on_eol", "stop_on_double_eol", "prevent_newline_after_colon", "random_seed", "stop_token",
    "length_penalty",
)


def read_prompts(body: dict) -> List[str]:
    if "prompts" not in body:
        raise RequestError("prompts is not in the request: send {\"prompts\": [\"...\"]}", field="prompts")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts must be a list of strings", field="prompts")
    if not prompts:
        raise RequestError("prompts is empty: send at least one prompt", field="prompts")
    return prompts


def sampling_params(body: dict) -> SamplingParams:
    tokens_to_generate = get_int(body, "tokens_to_generate", 64, low=0)
    logprobs = get_bool(body, "logprobs", False)
    if tokens_to_generate == 0 and not logprobs:
        raise RequestError("tokens_to_generate=0 scores the prompts only and needs logprobs=true",
                           field="tokens_to_generate")
    temperature = get_float(body, "temperature", 1.0, low=0.0, high=100.0, low_open=True)
    top_k = get_int(body, "top_k", 0, low=0, high=1000)
    top_p = get_float(body, "top_p", 0.0, low=0.0, high=1.0)
    if top_k > 0 and top_p > 0.0:
        raise RequestError("top_k and top_p cannot both be set: use one of them", field="top_p")
    for name in ("top_p_decay", "top_p_bound"):
        if get_float(body, name, None, low=0.0, high=1.0) is not None and top_p == 0.0:
            raise RequestError(f"{name} needs top_p > 0", field=name)
    seed = get_int(body, "random_seed", -1, low=-1)
    get_int(body, "stop_token", 50256, low=0)
    get_float(body, "length_penalty", 1.0)
    get_bool(body, "prevent_newline_after_colon", False)
    stops = []
    if get_bool(body, "stop_on_double_eol", False):
        stops.append("\n\n")
    if get_bool(body, "stop_on_eol", False):
        stops.append("\n")
    return SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, return_log_probs=logprobs,
        num_tokens_to_generate=tokens_to_generate, random_seed=None if seed < 0 else seed, stop_strings=tuple(stops),
    )


def parse_api_request(body, service) -> Tuple[List[InferenceRequest], bool]:
    """(requests, logprobs wanted) for a PUT /api body; RequestError on any mistake."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, message in REJECTED.items():
        if key in body:
            raise RequestError(message, field=key)
    check_known_fields(body, KNOWN, "PUT /api")
    prompts = read_prompts(body)
    params = sampling_params(body)
    add_bos = get_bool(body, "add_BOS", False)
    if add_bos and not service.has_bos:
        raise RequestError("add_BOS is set but the tokenizer has no BOS token", field="add_BOS")
    for i, prompt in enumerate(prompts):
        if not prompt and not add_bos:
            raise RequestError(f"prompts[{i}] is an empty string: an empty prompt needs add_BOS=true", field="prompts")
    if len(prompts) > service.limits.max_prompts:
        raise RequestError(f"prompts: {len(prompts)} prompts exceed the maximum of {service.limits.max_prompts} per request",
                           field="prompts")
    tokens = [service.tokenize(p, add_bos=add_bos) for p in prompts]
    service.check(tokens, [params.num_tokens_to_generate] * len(tokens), "prompts", "tokens_to_generate")
    return [InferenceRequest(t, params) for t in tokens], params.return_log_probs


def api_response(prompts_text: List[str], results: List[GenerationResult], service, logprobs: bool) -> dict:
    """Megatron's reply: text (prompt + generation), tokens, segments, and logprobs if asked."""
    text, tokens, segments, log_probs = [], [], [], []
    for prompt, result in zip(prompts_text, results):
        all_tokens = result.prompt_tokens + result.generated_tokens
        tokens.append(all_tokens)
        text.append(prompt + service.continuation_text(result.prompt_tokens, result.generated_tokens))
        segments.append([service.detokenize([t]) for t in all_tokens])
        if logprobs:
            log_probs.append(result.prompt_log_probs + result.generated_log_probs)
    reply = {"text": text, "segments": segments, "tokens": tokens}
    if logprobs:
        reply["logprobs"] = log_probs
    return reply
