"""What the Megatron-LM interop tests share: the checkpoint Megatron-LM itself wrote (a
GPT-2-style tiny model in both formats, with the logits Megatron's model gives), the flags
of that model here, and the logits of a full state dict on one process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch

from tests.training.gpt_runs import TINY_GPT


def _find_fixture() -> Optional[Path]:
    """<root>/shared/fixtures/megatron-ckpt-gpt2 in this checkout or a parent folder."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "fixtures" / "megatron-ckpt-gpt2"
        if candidate.is_dir():
            return candidate
    return None


FIXTURE = _find_fixture()
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason="the Megatron-LM checkpoint fixture is not available")

# The fixture's model (2 layers, hidden 64, 4 heads, vocab 512 padded to 128, learned
# positions, LayerNorm, biases, tied embeddings, fused (tanh) GeLU) on top of the tiny GPT.
FIXTURE_FLAGS = TINY_GPT + ["--seq-length", "64", "--max-position-embeddings", "64",
                            "--make-vocab-size-divisible-by", "128", "--global-batch-size", "4",
                            "--lr-warmup-iters", "0"]

# Megatron's logits against ours: both fp32 on CPU, the same math in another order
# (Megatron's fused bias-GeLU and softmax); measured 2.4e-7 apart, well inside 1e-5.
LOGITS_TOL = dict(atol=1e-5, rtol=0)


def fixture_model() -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                               hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(config, vocab_size=512, max_sequence_length=64).eval()


def logits_of(state: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The fixture model's logits for the fixture's tokens, with ``state`` (our global
    names; optimizer entries ignored) loaded on one process."""
    model = fixture_model()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("optimizer.")}, strict=True)
    data = np.load(FIXTURE / "logits.npz")
    with torch.no_grad():
        return model(torch.from_numpy(data["tokens"]), torch.from_numpy(data["position_ids"]), None)


def megatron_logits() -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURE / "logits.npz")["logits"])


def assert_megatron_logits(state: Dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(logits_of(state), megatron_logits(), **LOGITS_TOL)


def read_full_tensors(directory: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint directory, whole, by key (one process)."""
    from megatron.core.dist_checkpointing import ShardedTensor, load_sharded
    from megatron.training.checkpointing.megatron_lm.torch_dist import read_metadata
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(directory)
    full = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}
    load_sharded([ShardedTensor.whole(key, tensor) for key, tensor in full.items()], [], directory)
    return full


# Transformer Engine's names of the norms fused into the next linear, as Megatron-LM saves
# them (written out here from the documented format, apart from megatron_lm.keys).
TE_NORMS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            "norm.": "mixer.in_proj.layer_norm_"}


def te_norm_name(rest: str) -> str:
    """A layer's tensor name (after ``<stack>.layers.<i>.``) under TE's norm names."""
    for ours, te in TE_NORMS.items():
        if rest.startswith(ours):
            return te + rest[len(ours):]
    return rest


def mark_torch_dist(directory) -> None:
    """The ``metadata.json`` Megatron-LM writes beside a torch_dist checkpoint's files."""
    with open(os.path.join(directory, "metadata.json"), "w") as handle:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, handle)


def save_torch_dist(directory, state: dict) -> None:
    """``state`` (Megatron's keys: whole tensors and objects) as a torch_dist checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    dcp.save(state, checkpoint_id=str(directory), planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
    mark_torch_dist(directory)


def load_and_compare(directory: str, model, args, truth: Dict[str, torch.Tensor]) -> dict:
    """Load the Megatron-LM checkpoint ``directory`` into ``model`` on one process (its state
    must then equal ``truth`` exactly); returns the checkpoint's common state."""
    from megatron.core.process_groups import ProcessGroups
    from megatron.training.checkpointing import megatron_lm

    assert megatron_lm.is_megatron_checkpoint(directory)
    common = megatron_lm.load(directory, [model], ProcessGroups(), args, lambda p: [p], None)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(truth)
    for key, tensor in truth.items():
        assert torch.equal(loaded[key], tensor), key
    return common
