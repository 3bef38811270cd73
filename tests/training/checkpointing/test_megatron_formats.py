"""LLaMA-style (GQA, SwiGLU, RoPE, RMSNorm, untied) and MoE checkpoints in Megatron-LM's
layouts load exactly. The checkpoints are written here from the documented format (not by
our writer): torch_dist with layers stacked on a leading axis, experts on a second one,
Transformer Engine norm names and ``_extra_state`` entries; legacy per-rank files split
over TP, PP and EP as Megatron splits them (gated fc1 shards as [gate_i ; up_i])."""

import argparse
import os
import re

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups import ProcessGroups
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.dist_checkpointing import save_sharded
from megatron.training.checkpointing import megatron_lm
from tests.training.checkpointing.megatron_cases import (
    load_and_compare,
    mark_torch_dist,
    save_torch_dist,
    te_norm_name,
)
from megatron.training.checkpointing.megatron_lm import torch_dist
from megatron.training.checkpointing.directory import CheckpointError

LAYERS, EXPERTS = 2, 4


def _model(kind: str, seed: int, moe_layer_freq: int = 1) -> GPTModel:
    torch.manual_seed(seed)
    common = dict(num_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                  gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
                  use_cpu_initialization=True)
    if kind == "moe":
        common.update(num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=32, ffn_hidden_size=48,
                      moe_shared_expert_intermediate_size=32, qk_layernorm=True, moe_layer_freq=moe_layer_freq)
    else:
        common.update(ffn_hidden_size=96)
    return GPTModel(TransformerConfig(**common), vocab_size=128, max_sequence_length=32,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _args(kind: str, tp=1, pp=1, ep=1) -> argparse.Namespace:
    return argparse.Namespace(num_layers=LAYERS, num_experts=EXPERTS if kind == "moe" else None, moe_layer_freq=1,
                              swiglu=True, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep, consumed_train_samples=64)



def _stacked(truth: dict) -> dict:
    """Our full state dict -> Megatron's torch_dist tensors (layers, experts stacked)."""
    out = {}
    for key, tensor in truth.items():
        layer = re.match(r"decoder\.layers\.(\d+)\.(.+)", key)
        if not layer:
            out[key] = tensor
            continue
        i, rest = int(layer.group(1)), layer.group(2)
        expert = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(.+)", rest)
        if expert:
            name = f"decoder.layers.mlp.experts.experts.{expert.group(2)}"
            out.setdefault(name, torch.zeros(LAYERS, EXPERTS, *tensor.shape))[i, int(expert.group(1))] = tensor
        else:
            name = f"decoder.layers.{te_norm_name(rest)}"
            out.setdefault(name, torch.zeros(LAYERS, *tensor.shape))[i] = tensor
    for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        for i in range(LAYERS):
            out[f"decoder.layers.{module}._extra_state/shard_{i}_{LAYERS}"] = [None]
    return out


def _write_torch_dist(directory: str, truth: dict, args, common_file: bool = False) -> None:
    """``common_file``: the common state in ``common.pt`` (Megatron-Core <= 0.18), not in the distcp files."""
    state = _stacked(truth)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 7, "num_floating_point_operations_so_far": 0.0}
    if common_file:
        os.makedirs(directory, exist_ok=True)
        torch.save(common, os.path.join(directory, "common.pt"))
    else:
        state["common_state/shard_0_1"] = [common]
    save_torch_dist(directory, state)


def _shard(key: str, tensor: torch.Tensor, t: int, tp: int) -> torch.Tensor:
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return tensor.chunk(tp, dim=1)[t]
    if key.endswith("linear_fc1.weight"):
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
    if key.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        return tensor.chunk(tp, dim=0)[t]  # QKV rows are whole query groups per rank
    return tensor


def _rank_model(truth: dict, t: int, p: int, e: int, tp: int, pp: int, ep: int, te_names: bool) -> dict:
    per_stage, per_rank = LAYERS // pp, EXPERTS // ep
    out = {}
    for key, tensor in truth.items():
        layer = re.match(r"decoder\.layers\.(\d+)\.(.+)", key)
        if layer:
            i, rest = int(layer.group(1)), layer.group(2)
            if i // per_stage != p:
                continue
            expert = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(.+)", rest)
            if expert:
                if int(expert.group(1)) // per_rank != e:
                    continue
                rest = f"mlp.experts.local_experts.{int(expert.group(1)) % per_rank}.{expert.group(2)}"
            key = f"decoder.layers.{i % per_stage}.{te_norm_name(rest) if te_names else rest}"
        elif key.startswith("embedding.") and p != 0:
            continue
        elif key.startswith(("decoder.final", "output_layer")) and p != pp - 1:
            continue
        out[key] = _shard(key, tensor, t, tp).clone()
        if key.endswith("linear_fc1.weight"):
            out[key[: -len("weight")] + "_extra_state"] = None
    return out


def _write_legacy(directory: str, truth: dict, args, te_names: bool) -> None:
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                os.makedirs(os.path.join(directory, name))
                torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7,
                            "model": _rank_model(truth, t, p, e, tp, pp, ep, te_names)},
                           os.path.join(directory, name, "model_optim_rng.pt"))


def _load_and_compare(directory: str, kind: str, truth: dict) -> dict:
    return load_and_compare(directory, _model(kind, seed=1), _args(kind), truth)


@pytest.mark.parametrize("kind, common_file", [("llama", False), ("moe", False), ("llama", True)])
def test_torch_dist_stacked_layout_loads_exactly(tmp_path, kind, common_file):
    truth = _model(kind, seed=0).state_dict()
    _write_torch_dist(str(tmp_path), truth, _args(kind), common_file)
    common = _load_and_compare(str(tmp_path), kind, truth)
    assert common["iteration"] == 7 and common["args"].consumed_train_samples == 64


@pytest.mark.parametrize("kind, sizes, te_names", [
    ("llama", dict(tp=2), True),
    ("llama", dict(pp=2), False),
    ("moe", dict(tp=2, ep=2), False),
    ("moe", dict(pp=2, ep=2), True),
])
def test_legacy_per_rank_files_of_any_layout_merge_exactly(tmp_path, kind, sizes, te_names):
    truth = _model(kind, seed=0).state_dict()
    _write_legacy(str(tmp_path), truth, _args(kind, **sizes), te_names)
    assert _load_and_compare(str(tmp_path), kind, truth)["iteration"] == 7


def test_a_mismatched_model_is_refused_before_any_weight_changes(tmp_path):
    truth = _model("llama", seed=0).state_dict()
    _write_torch_dist(str(tmp_path), truth, _args("llama"))
    model = _model("moe", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"(?s)does not fit this model.*"
                       r"missing from the checkpoint: decoder.layers.mlp.experts.experts.linear_fc1.weight"):
        megatron_lm.load(str(tmp_path), [model], ProcessGroups(), _args("moe"), lambda p: [p], None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("freq, expected", [
    (1, ["decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.linear_fc1.layer_norm_weight"]),
    (2, ["decoder.layers.0.mlp.experts.experts.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc1.weight"]),
])
def test_megatron_layout_writer_stacks_only_homogeneous_layers_and_round_trips(tmp_path, freq, expected):
    """MoE in every layer: stacked keys; MoE every 2nd layer: per-layer keys (Megatron's
    rule for non-homogeneous stacks). Either reads back exactly."""
    truth = _model("moe", seed=0, moe_layer_freq=freq)
    args = _args("moe")
    args.moe_layer_freq = freq
    tensors, objects = torch_dist.build_save_items([truth], ProcessGroups(), 0, args, 3, 0.0, to_cpu=False)
    assert set(expected) <= {t.key for t in tensors}
    assert f"decoder.layers.{'' if freq == 1 else '0.'}mlp.experts.experts.linear_fc1._extra_state/shard_" \
        f"{'0.3_2.4' if freq == 1 else '3_4'}" in {o.key for o in objects}
    # Megatron's GPTModel drops the output layer's extra state from torch_dist (untied here)
    assert not any(o.key.startswith("output_layer.") for o in objects)
    save_sharded(tensors, objects, str(tmp_path))
    mark_torch_dist(tmp_path)
    model = _model("moe", seed=1, moe_layer_freq=freq)
    common = megatron_lm.load(str(tmp_path), [model], ProcessGroups(), args, lambda p: [p], None)
    assert common["iteration"] == 3
    for key, tensor in truth.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_megatron_layout_writers_leave_out_fp8_scaling_state(tmp_path):
    """Megatron-LM keeps FP8 metadata in Transformer Engine's extra state (written empty here)
    and its legacy load is strict, so neither writer puts our FP8 buffers in; the weights
    still read back exactly, the FP8 state then starting fresh."""
    from megatron.core.fp8.scaling import is_fp8_scaling_key
    from megatron.training.checkpointing.megatron_lm import legacy

    def fp8_model(seed):
        torch.manual_seed(seed)
        config = TransformerConfig(num_layers=LAYERS, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                                   fp8="hybrid", fp8_emulation=True)
        return GPTModel(config, vocab_size=128, max_sequence_length=32)

    model, args = fp8_model(0), _args("llama")
    tensors, _ = torch_dist.build_save_items([model], ProcessGroups(), 0, args, 3, 0.0, to_cpu=False)
    _, payload, _ = legacy.build_payload(args, 3, [model], 0.0, ProcessGroups())
    assert not any(is_fp8_scaling_key(t.key) for t in tensors)
    assert not any(is_fp8_scaling_key(k) for k in payload["model"])
    assert any(is_fp8_scaling_key(k) for k in model.state_dict())
    os.makedirs(tmp_path / "mp_rank_00")
    torch.save(payload, tmp_path / "mp_rank_00" / "model_optim_rng.pt")
    fresh = fp8_model(1)
    megatron_lm.load(str(tmp_path), [fresh], ProcessGroups(), args, lambda p: [p], None)
    for key, tensor in model.state_dict().items():
        if not is_fp8_scaling_key(key):
            assert torch.equal(fresh.state_dict()[key], tensor), key
