"""A tiny random GPT served over real HTTP on 127.0.0.1 (uvicorn in a thread), with a
GPT-2 byte-level BPE tokenizer (offline assets) that has a chat template."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron.core.inference import StaticInferenceEngine
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MAX_SEQ = 64


def _assets() -> Path:
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "assets" / "tokenizers" / "gpt2"
        if candidate.is_dir():
            return candidate
    pytest.skip("shared/assets/tokenizers/gpt2 not found beside the repository")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    assets = _assets()
    tok = transformers.GPT2Tokenizer(vocab=str(assets / "vocab.json"), merges=str(assets / "merges.txt"))
    tok.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(str(directory))
    return directory


def tiny_gpt(vocab_size: int, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=64, use_cpu_initialization=True, normalization="RMSNorm",
                               gated_linear_unit=True, add_bias_linear=False, hidden_dropout=0.0,
                               attention_dropout=0.0, init_method_std=0.2)
    return GPTModel(config, vocab_size=vocab_size, max_sequence_length=MAX_SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False).eval()


class RunningServer:
    def __init__(self, service, app):
        import uvicorn

        self.service = service
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session", params=["static", "dynamic"])
def server(request, hf_tokenizer_dir):
    """The server with the static engine (one request at a time) and with continuous
    batching (requests join a running batch). ``reference`` is a separate static engine on
    the same model, for expected answers computed without HTTP."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from megatron.core.inference import DynamicInferenceEngine
    from megatron.inference.app import build_app
    from megatron.inference.dynamic_service import DynamicGenerationService
    from megatron.inference.text_service import ServingLimits, TextGenerationService
    from megatron.training.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(str(hf_tokenizer_dir))
    model = tiny_gpt(50304)
    common = dict(vocab_size=tokenizer.vocab_size, detokenize=tokenizer.detokenize)
    limits = ServingLimits(max_prompts=6, max_sequence_length=MAX_SEQ, max_tokens_to_oom=4 * MAX_SEQ,
                           max_body_bytes=64 * 1024)
    if request.param == "static":
        service = TextGenerationService(StaticInferenceEngine(model, 4, MAX_SEQ, **common), tokenizer, limits,
                                        model_name="tiny-gpt")
    else:
        engine = DynamicInferenceEngine(model, 4, num_blocks=80, block_size=8, max_tokens_per_step=32,
                                        max_sequence_length=MAX_SEQ, **common)
        service = DynamicGenerationService(engine, tokenizer, limits, model_name="tiny-gpt")
    running = RunningServer(service, build_app(service))
    running.reference = StaticInferenceEngine(model, 1, MAX_SEQ, **common)
    yield running
    running.stop()
