"""BERT checkpoints in Megatron-LM's layouts load exactly, and the Megatron-layout writer
writes them as Megatron-LM does.

The checkpoints are written here from the documented format (not by our writer): Megatron's
BertModel keeps its layers under ``encoder`` (stacked on a leading axis in torch_dist),
with Transformer Engine's norm names (``self_attention.linear_qkv.layer_norm_weight`` and
``_bias``), and the heads ``lm_head.dense``, ``lm_head.layer_norm``, ``pooler.dense``,
``binary_head`` and the vocabulary-parallel ``output_layer.bias``; legacy per-rank files
split over TP as Megatron splits them.
"""

import argparse
import os
import re

import pytest
import torch

from megatron.core.dist_checkpointing import save_sharded
from megatron.core.process_groups import ProcessGroups
from tests.training.checkpointing.megatron_cases import (
    load_and_compare,
    mark_torch_dist,
    save_torch_dist,
    te_norm_name,
)
from megatron.training.checkpointing.megatron_lm import torch_dist

LAYERS = 2


def _model(seed: int):
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    model = BertModel(config, vocab_size=64, max_sequence_length=16, num_tokentypes=2, add_binary_head=True)
    with torch.no_grad():
        for param in model.parameters():  # no two tensors alike, no norm all ones
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _args(tp=1, pp=1) -> argparse.Namespace:
    return argparse.Namespace(num_layers=LAYERS, num_experts=None, swiglu=False, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, expert_model_parallel_size=1)



def _megatron_torch_dist(truth: dict) -> dict:
    out = {}
    for key, tensor in truth.items():
        layer = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
        if layer:
            name = f"encoder.layers.{te_norm_name(layer.group(2))}"
            out.setdefault(name, torch.zeros(LAYERS, *tensor.shape))[int(layer.group(1))] = tensor
        else:
            out[key] = tensor
    for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        for i in range(LAYERS):
            out[f"encoder.layers.{module}._extra_state/shard_{i}_{LAYERS}"] = [None]
    return out


def _tp_shard(key: str, tensor: torch.Tensor, t: int, tp: int) -> torch.Tensor:
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return tensor.chunk(tp, dim=1)[t]
    if key.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                     "word_embeddings.weight", "output_layer.bias")):
        return tensor.chunk(tp, dim=0)[t]
    return tensor


def _write_legacy(directory: str, truth: dict, tp: int) -> None:
    for t in range(tp):
        state = {}
        for key, tensor in truth.items():
            layer = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
            name = f"encoder.layers.{layer.group(1)}.{te_norm_name(layer.group(2))}" if layer else key
            state[name] = _tp_shard(key, tensor, t, tp).clone()
        os.makedirs(os.path.join(directory, f"mp_rank_{t:02d}"))
        torch.save({"args": _args(tp), "checkpoint_version": 3.0, "iteration": 9, "model": state},
                   os.path.join(directory, f"mp_rank_{t:02d}", "model_optim_rng.pt"))


def _load_and_compare(directory: str, truth: dict) -> dict:
    return load_and_compare(directory, _model(seed=1), _args(), truth)


def test_torch_dist_stacked_encoder_loads_exactly(tmp_path):
    truth = _model(seed=0).state_dict()
    state = _megatron_torch_dist(truth)
    state["common_state/shard_0_1"] = [{"args": _args(), "checkpoint_version": 3.0, "iteration": 9}]
    save_torch_dist(str(tmp_path), state)
    assert _load_and_compare(str(tmp_path), truth)["iteration"] == 9


@pytest.mark.parametrize("tp", [1, 2])
def test_legacy_per_rank_files_merge_exactly(tmp_path, tp):
    truth = _model(seed=0).state_dict()
    _write_legacy(str(tmp_path), truth, tp)
    assert _load_and_compare(str(tmp_path), truth)["iteration"] == 9


def test_megatron_layout_writer_matches_the_format_and_round_trips(tmp_path):
    model = _model(seed=0)
    truth = model.state_dict()
    tensors, objects = torch_dist.build_save_items([model], ProcessGroups(), 0, _args(), 9, 0.0, to_cpu=False)
    expected = _megatron_torch_dist(truth)
    assert {t.key: t.global_shape for t in tensors} == \
        {k: tuple(v.shape) for k, v in expected.items() if isinstance(v, torch.Tensor)}
    assert {o.key for o in objects} == {k for k in expected if "_extra_state" in k} | {"common_state/shard_0_1"}
    save_sharded(tensors, objects, str(tmp_path))
    mark_torch_dist(tmp_path)
    _load_and_compare(str(tmp_path), truth)
