"""Hybrid (Mamba + attention + MLP) checkpoints in Megatron-LM's layouts load exactly, and
the Megatron-layout writer writes them as Megatron-LM does.

The checkpoints are written here from the documented format (not by our writer):
torch_dist with per-layer keys (Megatron's hybrid stack never stacks its layers), the
norms under Transformer Engine's names (``mixer.in_proj.layer_norm_weight``, ...), and a
Mamba mixer's fused tensors stored part by part (``mixer.in_proj.weight.z`` ... ``.dt``,
``mixer.conv1d.weight.x`` ... ``.C``); legacy per-rank files split over TP as Megatron
splits them (each rank's in_proj is [z_i ; x_i ; B_i ; C_i ; dt_i]) and over PP at the
pattern's ``|`` cuts.
"""

import argparse
import os
import re

import pytest
import torch

from megatron.core.dist_checkpointing import save_sharded
from megatron.core.process_groups import ProcessGroups
from megatron.training.checkpointing import megatron_lm
from tests.training.checkpointing.megatron_cases import (
    load_and_compare,
    mark_torch_dist,
    save_torch_dist,
    te_norm_name,
)
from megatron.training.checkpointing.directory import CheckpointError
from megatron.training.checkpointing.megatron_lm import legacy, torch_dist
from tests.multirank import run_on_ranks

PATTERN = "M*-M"
HEADS, HEAD_DIM, GROUPS, STATE = 8, 8, 2, 8
INNER, BC = HEADS * HEAD_DIM, GROUPS * STATE
PARTS = {"mixer.in_proj.weight": (("z", INNER), ("x", INNER), ("B", BC), ("C", BC), ("dt", HEADS)),
         "mixer.conv1d.weight": (("x", INNER), ("B", BC), ("C", BC)),
         "mixer.conv1d.bias": (("x", INNER), ("B", BC), ("C", BC))}


def _model(seed: int, pattern: str = PATTERN, groups=None):
    from megatron.core.models.mamba import MambaModel
    from megatron.core.ssm.mamba_config import MambaConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=len(pattern.replace("|", "")), hidden_size=32, num_attention_heads=4,
                               ffn_hidden_size=48, use_cpu_initialization=True, normalization="RMSNorm",
                               add_bias_linear=False)
    mamba = MambaConfig(mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS,
                        mamba_num_heads=HEADS, chunk_size=4)
    model = MambaModel(config, mamba, pattern, vocab_size=64, max_sequence_length=16, pg_collection=groups)
    with torch.no_grad():
        for param in model.parameters():  # no two tensors alike, none all ones
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _args(tp=1, pp=1, pattern=PATTERN) -> argparse.Namespace:
    return argparse.Namespace(num_layers=len(pattern.replace("|", "")), num_experts=None, is_hybrid_model=True,
                              hybrid_layer_pattern=pattern, swiglu=False, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, expert_model_parallel_size=1)



def _split(rest: str, tensor: torch.Tensor, tp: int = 1, t: int = 0) -> dict:
    """{suffix: this TP rank's part} of a fused tensor (one entry "" for other tensors)."""
    if rest not in PARTS:
        return {"": tensor}
    out, start = {}, 0
    for part, size in PARTS[rest]:
        out["." + part] = tensor[start:start + size].chunk(tp)[t]
        start += size
    return out


def _megatron_torch_dist(truth: dict) -> dict:
    out = {}
    for key, tensor in truth.items():
        layer = re.match(r"decoder\.layers\.(\d+)\.(.+)", key)
        if not layer:
            out[key] = tensor
            continue
        i, rest = layer.group(1), layer.group(2)
        for suffix, part in _split(rest, tensor).items():
            out[f"decoder.layers.{i}.{te_norm_name(rest)}{suffix}"] = part
    for i, kind in enumerate(PATTERN):
        modules = {"M": ("mixer.in_proj", "mixer.out_proj"), "*": ("self_attention.linear_qkv",
                   "self_attention.linear_proj"), "-": ("mlp.linear_fc1", "mlp.linear_fc2")}[kind]
        for module in modules:
            out[f"decoder.layers.{i}.{module}._extra_state/shard_0_1"] = [None]
    out["output_layer._extra_state/shard_0_1"] = [None]
    return out


def _write_torch_dist(directory: str, truth: dict) -> None:
    state = _megatron_torch_dist(truth)
    state["common_state/shard_0_1"] = [{"args": _args(), "checkpoint_version": 3.0, "iteration": 5,
                                        "num_floating_point_operations_so_far": 0.0}]
    save_torch_dist(directory, state)


def _tp_shard(rest: str, tensor: torch.Tensor, t: int, tp: int) -> torch.Tensor:
    if rest in PARTS:
        return torch.cat(list(_split(rest, tensor, tp, t).values()))
    if rest.endswith(("linear_proj.weight", "linear_fc2.weight", "mixer.out_proj.weight")):
        return tensor.chunk(tp, dim=1)[t]
    if rest.endswith(("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight",
                      "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight")):
        return tensor.chunk(tp, dim=0)[t]
    return tensor


def _write_legacy(directory: str, truth: dict, pattern: str, tp: int, pp: int) -> None:
    """Megatron's per-rank files: layers numbered per stage, stages at the pattern's cuts."""
    segments = pattern.split("|") if "|" in pattern else [pattern]
    starts = [sum(len(s) for s in segments[:p]) for p in range(len(segments))]
    for t in range(tp):
        for p in range(pp):
            state = {}
            for key, tensor in truth.items():
                layer = re.match(r"decoder\.layers\.(\d+)\.(.+)", key)
                if layer:
                    i, rest = int(layer.group(1)), layer.group(2)
                    if not starts[p] <= i < starts[p] + len(segments[p]):
                        continue
                    state[f"decoder.layers.{i - starts[p]}.{te_norm_name(rest)}"] = _tp_shard(rest, tensor, t, tp)
                    if rest == "mixer.in_proj.weight":
                        state[f"decoder.layers.{i - starts[p]}.mixer.in_proj._extra_state"] = None
                elif (key.startswith("embedding.") and p == 0) or (not key.startswith("embedding.") and p == pp - 1):
                    state[key] = _tp_shard(key, tensor, t, tp)
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            os.makedirs(os.path.join(directory, name))
            torch.save({"args": _args(tp, pp, pattern), "checkpoint_version": 3.0, "iteration": 5,
                        "model": {k: v if v is None else v.clone() for k, v in state.items()}},
                       os.path.join(directory, name, "model_optim_rng.pt"))


def _load_and_compare(directory: str, truth: dict, pattern: str = PATTERN) -> dict:
    return load_and_compare(directory, _model(seed=1, pattern=pattern), _args(pattern=pattern), truth)


def test_torch_dist_per_layer_parts_load_exactly(tmp_path):
    truth = _model(seed=0).state_dict()
    _write_torch_dist(str(tmp_path), truth)
    assert _load_and_compare(str(tmp_path), truth)["iteration"] == 5


@pytest.mark.parametrize("pattern, tp, pp", [(PATTERN, 2, 1), ("M*|-M", 1, 2), ("M|*-M", 2, 2)],
                         ids=["tp2", "pp2-cut", "tp2xpp2-uneven-cut"])
def test_legacy_per_rank_files_merge_exactly(tmp_path, pattern, tp, pp):
    truth = _model(seed=0, pattern=pattern).state_dict()
    _write_legacy(str(tmp_path), truth, pattern, tp, pp)
    assert _load_and_compare(str(tmp_path), truth, pattern)["iteration"] == 5


def test_a_mixer_of_another_shape_is_refused_by_key(tmp_path):
    truth = _model(seed=0).state_dict()
    state = _megatron_torch_dist(truth)
    del state["decoder.layers.3.mixer.conv1d.weight.B"]
    state["common_state/shard_0_1"] = [{"args": _args(), "iteration": 5}]
    save_torch_dist(tmp_path, state)
    model = _model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: decoder.layers.3.mixer.conv1d.weight.B"):
        megatron_lm.load(str(tmp_path), [model], ProcessGroups(), _args(), lambda p: [p], None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_megatron_layout_writer_matches_the_format_and_round_trips(tmp_path):
    """Our writer gives exactly the keys and shapes of the documented layout (per-layer,
    TE norm names, fused tensors by part), and what it writes reads back exactly."""
    model = _model(seed=0)
    truth = model.state_dict()
    tensors, objects = torch_dist.build_save_items([model], ProcessGroups(), 0, _args(), 5, 0.0, to_cpu=False)
    expected = {k: tuple(v.shape) for k, v in _megatron_torch_dist(truth).items() if isinstance(v, torch.Tensor)}
    assert {t.key: t.global_shape for t in tensors} == expected
    assert {o.key for o in objects} == {k for k in _megatron_torch_dist(truth) if "_extra_state" in k} | \
        {"common_state/shard_0_1"}
    save_sharded(tensors, objects, str(tmp_path))
    mark_torch_dist(tmp_path)
    _load_and_compare(str(tmp_path), truth)


def test_legacy_writer_uses_transformer_engine_names_and_round_trips(tmp_path):
    model = _model(seed=0)
    truth = model.state_dict()
    args = _args()
    args.iteration = 5
    subdir, state, _ = legacy.build_payload(args, 5, [model], 0.0, ProcessGroups())
    written = state["model"]
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in written
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in written
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in written
    assert "decoder.layers.0.mixer.in_proj._extra_state" in written and "decoder.layers.0.norm.weight" not in written
    os.makedirs(os.path.join(tmp_path, subdir))
    torch.save(state, os.path.join(tmp_path, subdir, "model_optim_rng.pt"))
    _load_and_compare(str(tmp_path), truth)


def _load_into_tp2(rank, world, directory):
    import torch.distributed as dist

    from megatron.core.dist_checkpointing.model_sharding import model_placements

    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    truth = _model(seed=0, groups=ProcessGroups(tp=alone)).state_dict()
    groups = ProcessGroups(tp=dist.group.WORLD)
    model = _model(seed=1, groups=groups)
    megatron_lm.load(directory, [model], groups, _args(), lambda p: [p], dist.group.WORLD)
    wrong = []
    for tensor, placement in model_placements([model], groups):
        for chunk in placement.shard(tensor.data):
            region = tuple(slice(o, o + n) for o, n in zip(chunk.global_offset, chunk.data.shape))
            if not torch.equal(chunk.data, truth[placement.key][region]):
                wrong.append(placement.key)
    return wrong


def test_a_one_rank_checkpoint_loads_into_two_tensor_parallel_ranks(tmp_path):
    """Each TP rank reads its block of each part of the fused tensors."""
    _write_torch_dist(str(tmp_path), _model(seed=0).state_dict())
    assert run_on_ranks(_load_into_tp2, 2, args=(str(tmp_path),)) == [[], []]
