"""tools/run_text_generation_server.py serves a Mamba/hybrid checkpoint: a Hugging Face
NemotronH model (Mamba, MLP and attention layers) imported by the converter, served with
--use-checkpoint-args (the hybrid layout and mixer shape come from the checkpoint), answers
PUT /api and /v1/completions with exactly HF ``generate``'s greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tests.inference.test_run_text_generation_server import served

requests = pytest.importorskip("requests")
pytest.importorskip("uvicorn")
pytest.importorskip("safetensors")


def test_served_hybrid_checkpoint_generates_like_transformers(tmp_path):
    import convert
    from tests.core.models.test_mamba_nemotron_h_parity import hf as nemotron_h

    hf = nemotron_h.__wrapped__()
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    convert.main(["--model-type", "Mamba", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                  "--save-dir", str(tmp_path / "core")])
    with served(tmp_path / "core", "--inference-max-seq-length", "32") as url:
        prompt = [5, 17, 3, 90, 42, 8]
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0].tolist()
        reply = requests.put(url + "/api", json={"prompts": [" ".join(map(str, prompt))], "tokens_to_generate": 12,
                                                 "top_k": 1}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["tokens"][0] == expected
        completion = requests.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0},
                                   timeout=60)
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"].split() == [str(t) for t in expected[len(prompt):]]
