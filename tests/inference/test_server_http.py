"""The server over real HTTP: Megatron's PUT /api (requests), the OpenAI-compatible routes
(the openai client, streaming included), the CLI, concurrency, disconnects, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from megatron.core.inference import InferenceRequest, SamplingParams

requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _alone(server, text, n):
    """Greedy tokens of ``text`` from the reference engine (no HTTP)."""
    prompt = server.service.tokenize(text)
    result = server.reference.generate([InferenceRequest(prompt, SamplingParams(top_k=1, num_tokens_to_generate=n))])
    return prompt, result[0].generated_tokens


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_put_api_returns_megatrons_fields(server):
    prompts = ["Hello world", "The quick brown fox jumps"]
    reply = requests.put(server.url + "/api", json={"prompts": prompts, "tokens_to_generate": 5, "top_k": 1,
                                                    "logprobs": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"text", "tokens", "segments", "logprobs"}
    for i, text in enumerate(prompts):
        prompt, generated = _alone(server, text, 5)
        assert body["tokens"][i] == prompt + generated
        assert body["text"][i] == text + server.service.continuation_text(prompt, generated)
        assert len(body["logprobs"][i]) == len(prompt) + 4 and all(lp <= 0 for lp in body["logprobs"][i])
        assert "".join(body["segments"][i]) == server.service.detokenize(prompt + generated)


def test_put_api_score_only_and_seeded_sampling(server):
    scored = requests.put(server.url + "/api", json={"prompts": ["Hello world again"], "tokens_to_generate": 0,
                                                     "logprobs": True}, timeout=60).json()
    prompt = server.service.tokenize("Hello world again")
    assert scored["tokens"][0] == prompt and len(scored["logprobs"][0]) == len(prompt) - 1
    body = {"prompts": ["Once upon a time"], "tokens_to_generate": 8, "temperature": 1.0, "top_k": 50, "random_seed": 3}
    first = requests.put(server.url + "/api", json=body, timeout=60).json()
    again = requests.put(server.url + "/api", json=body, timeout=60).json()
    assert first["tokens"] == again["tokens"]


def test_openai_completions_chat_and_streaming(server):
    client = _client(server)
    prompt, generated = _alone(server, "Hello", 6)
    expected = server.service.continuation_text(prompt, generated)
    completion = client.completions.create(model="tiny-gpt", prompt="Hello", max_tokens=6, temperature=0)
    assert completion.choices[0].text == expected
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    streamed = client.completions.create(model="tiny-gpt", prompt="Hello", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected

    messages = [{"role": "user", "content": "Hi there"}]
    chat_prompt = server.service.chat_prompt(messages)
    result = server.reference.generate([InferenceRequest(chat_prompt, SamplingParams(top_k=1, num_tokens_to_generate=5))])
    expected_chat = server.service.continuation_text(chat_prompt, result[0].generated_tokens)
    chat = client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == expected_chat and chat.choices[0].message.role == "assistant"
    pieces = client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_chat
    assert chunks[-1].usage.completion_tokens == 5
    assert [m.id for m in client.models.list().data] == ["tiny-gpt"]


def test_stop_string_cuts_the_text(server):
    prompt, generated = _alone(server, "Hello", 12)
    full = server.service.continuation_text(prompt, generated)
    stop = full[3:6]
    reply = requests.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 12, "temperature": 0,
                                                                "stop": [stop]}, timeout=60).json()
    assert reply["choices"][0]["text"] == full[: full.find(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_megatron_completions_route(server):
    reply = requests.post(server.url + "/completions", json={"prompt": [[15496, 995]], "max_tokens": 0, "echo": True,
                                                             "logprobs": 1}, timeout=60)
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["token_logprobs"]) == 2
    missing = requests.post(server.url + "/completions", json={"prompt": "Hi"}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "max_tokens"


def test_top_logprobs_as_evaluation_harnesses_read_them(server):
    """A loglikelihood request as lm-eval's completions backend sends it (token ids, echo,
    logprobs 1, one new token): every prompt position has its log-prob and a top-logprobs
    entry holding the chosen token, so "is the continuation greedy" can be answered; the
    openai client and chat's top_logprobs give the reference engine's alternatives."""
    prompt = server.service.tokenize("The quick brown fox jumps")
    body = {"prompt": [prompt], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    reply = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    assert logprobs["top_logprobs"][0] is None and len(logprobs["top_logprobs"]) == len(prompt) + 1
    params = SamplingParams(top_k=1, num_tokens_to_generate=1, return_log_probs=True, top_logprobs=3)
    expected = server.reference.generate([InferenceRequest(prompt, params)])[0]
    chosen = prompt[1:] + expected.generated_tokens
    alternatives = expected.prompt_top_log_probs + expected.generated_top_log_probs
    for entry, token, value, best in zip(logprobs["top_logprobs"][1:], chosen, logprobs["token_logprobs"][1:],
                                         alternatives):
        assert entry[server.service.detokenize([token])] == pytest.approx(value)
        assert server.service.detokenize([best[0][0]]) in entry  # the best alternative, with logprobs=1
        is_greedy = value == max(entry.values())
        assert is_greedy == (token == best[0][0])
    client = _client(server)
    completion = client.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    tops = completion.choices[0].logprobs.top_logprobs
    for entry, best in zip(tops[1:], expected.prompt_top_log_probs):
        assert [server.service.detokenize([t]) for t, _ in best] == list(entry)[:3]
    chat = client.chat.completions.create(model="tiny-gpt", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(token.top_logprobs) == 2 for token in content)
    assert all(token.token == token.top_logprobs[0].token for token in content)  # greedy: the best one
    refused = requests.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"


def test_concurrent_clients_each_get_their_own_answer(server):
    texts = ["Alpha", "Beta gamma", "The", "A long time ago in a", "Numbers 1 2 3", "Zeta"]
    replies = {}

    def ask(text):
        replies[text] = requests.put(server.url + "/api", json={"prompts": [text], "tokens_to_generate": 4,
                                                                "top_k": 1}, timeout=60).json()

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for text in texts:
        prompt, generated = _alone(server, text, 4)
        assert replies[text]["tokens"][0] == prompt + generated


class _SlowStep:
    """The engine's model step, 20 ms slower: a 60-token generation outlasts the disconnect."""

    def __init__(self, step):
        self.step = step

    def __call__(self, *args):
        time.sleep(0.02)
        return self.step(*args)

    def __getattr__(self, name):
        return getattr(self.step, name)


def test_client_disconnecting_mid_stream_frees_the_engine(server, monkeypatch):
    monkeypatch.setattr(server.service.engine, "model_step", _SlowStep(server.service.engine.model_step))
    before = requests.get(server.url + "/health", timeout=10).json()["cancelled_requests"]
    body = {"prompt": "Hello", "max_tokens": 60, "temperature": 0, "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as response:
        next(response.iter_lines())  # generation is under way
    deadline = time.time() + 30
    health = {}
    while time.time() < deadline:
        health = requests.get(server.url + "/health", timeout=10).json()
        if health["active_requests"] == 0 and health["cancelled_requests"] > before:
            break
        time.sleep(0.05)
    assert health["active_requests"] == 0 and health["cancelled_requests"] == before + 1
    # the engine serves the next client
    assert requests.put(server.url + "/api", json={"prompts": ["Hi"], "tokens_to_generate": 2}, timeout=60).ok


BAD = [
    ("put", "/api", {"prompts": "Hello"}, 400, "prompts"),
    ("put", "/api", {"tokens_to_generate": 3}, 400, "prompts"),
    ("put", "/api", {"prompts": []}, 400, "prompts"),
    ("put", "/api", {"prompts": [""]}, 400, "prompts"),
    ("put", "/api", {"prompts": ["a"] * 7}, 400, "prompts"),
    ("put", "/api", {"prompts": ["Hello " * 70]}, 400, "prompts"),
    ("put", "/api", {"prompts": ["Hi"], "tokens_to_generate": 100}, 400, "tokens_to_generate"),
    ("put", "/api", {"prompts": ["Hi"], "tokens_to_generate": "5"}, 400, "tokens_to_generate"),
    ("put", "/api", {"prompts": ["Hi"], "tokens_to_generate": 0}, 400, "tokens_to_generate"),
    ("put", "/api", {"prompts": ["Hi"], "temperature": 0}, 400, "temperature"),
    ("put", "/api", {"prompts": ["Hi"], "top_k": 5, "top_p": 0.5}, 400, "top_p"),
    ("put", "/api", {"prompts": ["Hi"], "logprobs": "yes"}, 400, "logprobs"),
    ("put", "/api", {"prompts": ["Hi"], "max_len": 5}, 400, "max_len"),
    ("put", "/api", {"sentences": ["Hi"]}, 400, "sentences"),
    ("put", "/api", {"prompts": ["Hi"], "beam_width": 2}, 400, "beam_width"),
    ("put", "/api", {"prompts": ["Hi"], "bogus": 1}, 400, "bogus"),
    ("put", "/api", b"{not json", 400, None),
    ("put", "/api", b"[1, 2]", 400, None),
    ("put", "/api", {"prompts": ["x" * 70000]}, 413, None),
    ("post", "/v1/completions", {"prompt": "Hi", "n": 2}, 400, "n"),
    ("post", "/v1/completions", {"prompt": [[999999]]}, 400, "prompt"),
    ("post", "/v1/completions", {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "echo"),
    ("post", "/v1/chat/completions", {"messages": "Hi"}, 400, "messages"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 500}, 400, "max_tokens"),
]


@pytest.mark.parametrize("method,path,body,status,field", BAD, ids=[f"{p}-{f}-{i}" for i, (_, p, _, _, f) in enumerate(BAD)])
def test_bad_input_gets_a_clear_4xx_naming_the_field(server, method, path, body, status, field):
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    reply = getattr(requests, method)(server.url + path, timeout=60, **kwargs)
    assert reply.status_code == status, reply.text
    payload = reply.json()
    assert payload["message"] and payload["error"]["message"] == payload["message"]
    assert payload["error"]["param"] == field
    if field:
        assert field in payload["message"]


def test_openai_client_raises_on_bad_input(server):
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        _client(server).completions.create(model="tiny-gpt", prompt="Hi", max_tokens=2, presence_penalty=1.0)


def test_cli_sends_put_api_and_prints_the_reply(server):
    host = server.url[len("http://"):]
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "text_generation_cli.py"), host],
                         input="Hello\n3\nHello\n-1\n", capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    # the CLI samples (Megatron's defaults: temperature 1, no top-k): only the shape is known
    lines = [line for line in run.stdout.split("Enter number of tokens to generate: ") if "Megatron Response" in line]
    assert len(lines) == 1 and lines[0].startswith("Megatron Response: Hello")
    assert "Error 400: tokens_to_generate must be >= 0, got -1" in run.stdout
