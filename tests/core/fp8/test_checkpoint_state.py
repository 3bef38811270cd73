"""What checkpoint loaders need from the FP8 scaling state: the predicate that names its
keys, and resizing a saved amax history to another --fp8-amax-history-len (by hand, and
against a run that used the other length from the start)."""

import pytest
import torch

from megatron.core.fp8.recipe import GRAD_OUTPUT, INPUT, Fp8Recipe
from megatron.core.fp8.scaling import (
    Fp8Scaling,
    is_amax_history_key,
    is_fp8_scaling_key,
    resize_amax_history,
)


def test_the_predicate_names_exactly_the_scaling_buffers():
    scaling_keys = ["decoder.layers.3.mlp.linear_fc1.fp8.amax_history",
                    "decoder.layers.0.self_attention.linear_proj.fp8.scale",
                    "model.decoder.layers.1.mlp.linear_fc2.fp8.scale", "tp_rank_01.model.x.fp8.amax_history",
                    "fp8.scale"]
    for key in scaling_keys:
        assert is_fp8_scaling_key(key), key
    others = ["decoder.layers.3.mlp.linear_fc1.weight", "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
              "decoder.final_layernorm.scale", "decoder.layers.0.mlp.fc8.scale", "x.notfp8.scale",
              "decoder.layers.0.mlp.linear_fc1.fp8.amax_history.extra", "embedding.word_embeddings.weight"]
    for key in others:
        assert not is_fp8_scaling_key(key), key
    assert is_amax_history_key(scaling_keys[0]) and not is_amax_history_key(scaling_keys[1])
    # every buffer an FP8 linear saves is covered
    assert all(is_fp8_scaling_key("linear." + "fp8." + name) for name, _ in
               Fp8Scaling(Fp8Recipe(amax_history_len=2)).named_buffers())


def _rows(*values):
    return torch.tensor([[v, 10 * v, 100 * v] for v in values], dtype=torch.float32)


def test_resize_by_hand():
    # between calls: row 0 cleared for the next call, row 1 the newest amax, then older ones
    saved = _rows(0, 5, 4, 3)
    assert torch.equal(resize_amax_history(saved, 2), _rows(0, 5))
    assert torch.equal(resize_amax_history(saved, 3), _rows(0, 5, 4))
    assert torch.equal(resize_amax_history(saved, 6), _rows(0, 5, 4, 3, 0, 0))
    assert torch.equal(resize_amax_history(saved, 4), saved)
    # one row holds the last amax itself (nothing is cleared)
    assert torch.equal(resize_amax_history(saved, 1), _rows(5))
    assert torch.equal(resize_amax_history(_rows(7), 3), _rows(0, 7, 0))
    with pytest.raises(ValueError, match="--fp8-amax-history-len"):
        resize_amax_history(saved, 0)


def _run(length, amaxes, algo="max"):
    state = Fp8Scaling(Fp8Recipe(recipe="delayed", amax_history_len=length, amax_compute_algo=algo))
    for amax in amaxes:
        state.scale_for(torch.full((4,), float(amax)), INPUT)
        state.scale_for(torch.full((4,), float(amax) / 2), GRAD_OUTPUT)
    return state


@pytest.mark.parametrize("saved_len,new_len", [(4, 2), (4, 1), (3, 3), (2, 4), (1, 4)])
def test_resized_history_is_what_a_run_of_that_length_holds(saved_len, new_len):
    amaxes = [3.0, 9.0, 5.0, 2.0, 7.0]
    saved = _run(saved_len, amaxes).amax_history
    direct = _run(new_len, amaxes).amax_history
    resized = resize_amax_history(saved, new_len)
    kept = max(saved_len, 2) if new_len > 1 else 1  # rows the saved history can fill
    assert torch.equal(resized[:kept], direct[:kept])
    assert not resized[kept:].any()


def test_a_shorter_resized_history_continues_like_the_shorter_run():
    """After loading the resized history (and the scale as saved), the first call uses the
    saved scale and the next scale is the one the shorter run computes (its max over 2 rows,
    not the longer run's over 4)."""
    amaxes = [3.0, 9.0, 5.0, 2.0]
    long_run, short_run = _run(4, amaxes), _run(2, amaxes)
    resumed = Fp8Scaling(Fp8Recipe(recipe="delayed", amax_history_len=2, amax_compute_algo="max"))
    resumed.load_state_dict({"amax_history": resize_amax_history(long_run.amax_history, 2),
                             "scale": long_run.scale.clone()})
    assert resumed.scale_for(torch.full((4,), 1.0), INPUT).item() == long_run.scale[INPUT].item()
    short_run.scale_for(torch.full((4,), 1.0), INPUT)
    assert resumed.scale[INPUT].item() == short_run.scale[INPUT].item() != long_run.scale[INPUT].item()
    assert torch.equal(resumed.amax_history[:, INPUT], short_run.amax_history[:, INPUT])
