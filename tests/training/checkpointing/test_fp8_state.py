"""The FP8 part of checkpoint loading without a training run: state dicts of models with
other layers in FP8 (--first-last-layers-bf16) fit each other layer by layer, sharded
requests leave out or resize FP8 state and nothing else, and the log lines say which case
it was. (End to end, every format: test_fp8_checkpoint.py.)"""

import torch
import torch.nn.functional as F

from megatron.core.dist_checkpointing import ShardedTensor, compare_with_checkpoint
from megatron.core.fp8.scaling import is_fp8_scaling_key
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.checkpointing.fp8_state import (
    Fp8LoadReport,
    describe,
    finish_resizes,
    fit_sharded_requests,
    fit_state_dict,
)

VOCAB, SEQ = 64, 8


def _model(**fp8):
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                               use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                               activation_func=F.gelu, **fp8)
    torch.manual_seed(3)
    return GPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, parallel_output=False)


def _trained(model):
    """The model after one forward and backward: its FP8 state is no longer the initial one."""
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model(ids, None, None, labels=ids).sum().backward()
    return model


FP8 = dict(fp8="hybrid", fp8_emulation=True, fp8_amax_history_len=3, fp8_amax_compute_algo="max")
LAYER_1_IN_FP8 = dict(FP8, first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=0)


def _fp8_keys(state, layer):
    return {k for k in state if is_fp8_scaling_key(k) and k.startswith(f"decoder.layers.{layer}.")}


def test_a_checkpoint_with_some_fp8_layers_loads_layer_by_layer():
    saved = _trained(_model(**LAYER_1_IN_FP8)).state_dict()
    assert not _fp8_keys(saved, 0) and len(_fp8_keys(saved, 1)) == 8
    target = _model(**FP8)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = Fp8LoadReport()
    fit_state_dict(saved, target.state_dict(), report)
    target.load_state_dict(saved, strict=True)
    loaded = target.state_dict()
    for key in _fp8_keys(loaded, 1):
        assert torch.equal(loaded[key], saved[key]) and not torch.equal(loaded[key], fresh[key]), key
    for key in _fp8_keys(loaded, 0):
        assert torch.equal(loaded[key], fresh[key]), key
    assert len(report.fresh) == 4 and report.checkpoint_has_fp8 and not report.resized
    (line,) = describe(report)
    assert line.startswith("4 FP8 linear(s) start with fresh scaling state") and "other layers only" in line


def test_fp8_state_of_layers_not_in_fp8_here_is_left_out():
    saved = _trained(_model(**FP8)).state_dict()
    target = _model(**LAYER_1_IN_FP8)
    report = Fp8LoadReport()
    fit_state_dict(saved, target.state_dict(), report)
    target.load_state_dict(saved, strict=True)
    assert len(report.unused) == 4 and not report.fresh
    assert describe(report) == ["the checkpoint's FP8 scaling state of 4 linear(s) is not used: they do not run "
                                "in FP8 in this run"]


def test_sharded_requests_leave_out_or_resize_fp8_state_only():
    history = torch.zeros(2, 3)
    weight = torch.zeros(4, 4)
    requests = [ShardedTensor.whole("a.fp8.amax_history", history), ShardedTensor.whole("a.fp8.scale", torch.ones(3)),
                ShardedTensor.whole("b.fp8.amax_history", torch.zeros(2, 3)),
                ShardedTensor.whole("a.weight", weight), ShardedTensor.whole("c.weight", torch.zeros(2))]
    saved_shapes = {"a.fp8.amax_history": (4, 3), "a.fp8.scale": (3,), "a.weight": (4, 4)}
    report = Fp8LoadReport()
    kept, resizes = fit_sharded_requests(requests, saved_shapes, report)
    assert [r.key for r in kept] == ["a.fp8.amax_history", "a.fp8.scale", "a.weight", "c.weight"]
    assert kept[0].global_shape == (4, 3) and kept[0].data is not history
    assert report.fresh == {"b.fp8.amax_history"} and report.resized == {(4, 2)}
    # what is not FP8 state is still missing, and named
    metadata = type("Metadata", (), {"state_dict_metadata": {
        k: type("Entry", (), {"size": torch.Size(v)})() for k, v in saved_shapes.items()}})()
    mismatch = compare_with_checkpoint(kept, [], metadata)
    assert mismatch.missing == ["c.weight (2,)"] and not mismatch.wrong_shape
    kept[0].data.copy_(torch.tensor([[0.0] * 3, [1.0] * 3, [2.0] * 3, [3.0] * 3]))
    finish_resizes(resizes)
    assert torch.equal(history, torch.tensor([[0.0] * 3, [1.0] * 3]))
    # a scale of another shape is no history to resize: refused as a shape difference
    _, resizes = fit_sharded_requests([ShardedTensor.whole("a.fp8.scale", torch.ones(2))], saved_shapes, report)
    assert not resizes
