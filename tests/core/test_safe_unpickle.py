"""The restricted unpickler runs nothing from the file: names outside the allow map are
refused before anything is called; Megatron-style classes become recording stand-ins."""

import argparse
import enum
import io
import os
import pickle

import pytest
import torch

from megatron.core.safe_unpickle import (
    RefusedPickle,
    Recorded,
    recorded_class,
    restricted_loads,
    restricted_torch_load,
)


class _RunsCode:
    """Pickles as a call of ``os.system`` (what a crafted checkpoint would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Colour(enum.Enum):
    RED = 5


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps({"args": _RunsCode(marker)}, protocol=2)
    with pytest.raises(RefusedPickle, match=r"(posix|os)\.system"):
        restricted_loads(data, {}, source="crafted.pt")
    assert not marker.exists()
    # The same payload with the real unpickler would have run the command.
    pickle.loads(data)
    assert marker.exists()


def test_crafted_torch_file_is_refused_and_runs_nothing(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": _RunsCode(marker)}, path)
    with pytest.raises(RefusedPickle, match="model_optim_rng.pt"):
        restricted_torch_load(str(path), {})
    assert not marker.exists()


def test_allowed_names_and_tensors_load(tmp_path):
    path = tmp_path / "state.pt"
    args = argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16)
    torch.save({"args": args, "model": {"w": torch.arange(6.0).view(2, 3)}}, path)
    state = restricted_torch_load(str(path), {("argparse", "Namespace"): argparse.Namespace})
    assert state["args"] == args
    assert torch.equal(state["model"]["w"], torch.arange(6.0).view(2, 3))
    with pytest.raises(RefusedPickle, match="argparse.Namespace"):
        restricted_torch_load(str(path), {})


def test_stand_ins_record_enums_and_objects_without_importing_them():
    data = pickle.dumps({"backend": _Colour.RED}, protocol=2)
    module = _Colour.__module__

    def stand_in(mod, name):
        return recorded_class(mod, name) if mod == module else None

    value = restricted_loads(data, {}, stand_in)["backend"]
    assert isinstance(value, Recorded) and value.qualname == f"{module}._Colour" and value.value == 5
    # BUILD state (an object's __dict__) is recorded, never applied to a real class
    obj = restricted_loads(pickle.dumps(argparse.Namespace(a=1), protocol=2), {},
                           lambda mod, name: recorded_class(mod, name) if mod == "argparse" else None)
    assert isinstance(obj, Recorded) and obj.state == {"a": 1}
    assert restricted_loads(io.BytesIO(pickle.dumps([1, "two", 3.0, None])), {}) == [1, "two", 3.0, None]


def test_a_file_in_torch_s_pre_zip_format_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match=r"old\.pt: not a torch.save zip archive"):
        restricted_torch_load(str(path), {})
