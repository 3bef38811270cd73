"""A restricted unpickler: read pickles written elsewhere without running their code.

A pickle names the callables that rebuild its objects (``module.name``) and the loader
calls them; a crafted file can name ``os.system``. Here every name the pickle asks for is
looked up in an allow map, ``{(module, name): object}``, and whatever is not in the map is
refused with ``RefusedPickle`` before anything is called. The object a name maps to may be
the real class (for harmless ones such as ``collections.OrderedDict``) or a stand-in: a
plain class that only records what it was built from (``recorded_class``).
A ``stand_in`` function may supply a stand-in for whole families of names (all names
under a module prefix, say); it must never import or return real code from such names.

    allowed = {("argparse", "Namespace"): argparse.Namespace}
    value = restricted_loads(data, allowed)                  # a plain pickle
    state = restricted_torch_load("model_optim_rng.pt", allowed)    # torch.save files, with tensors

``restricted_torch_load`` reads ``torch.save`` files (zip or legacy) with their tensors;
tensor storages are resolved by torch itself, every other name goes through the map.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

Name = Tuple[str, str]
StandIn = Callable[[str, str], Optional[Any]]


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global that is not allowed; nothing it names was called."""


class Recorded:
    """Stand-in for an object of a class that is not loaded: ``qualname`` names the class,
    ``args``/``kwargs`` are what the pickle built it from, ``state`` what it was given
    after (pickle's BUILD). An enum member pickles as ``Class(value)``: ``value`` is then
    its value. Subclasses are made per pickled class by ``recorded_class``."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs) -> None:
        """Everything is recorded by ``__new__`` (pickle's NEWOBJ calls only that)."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        return self.args[0] if len(self.args) == 1 and not self.kwargs else None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Recorded) and other.qualname == self.qualname
                and (other.args, other.kwargs, other.state) == (self.args, self.kwargs, self.state))

    def __hash__(self) -> int:
        return hash((self.qualname, repr(self.args)))

    def __repr__(self) -> str:
        inner = ", ".join([repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        return f"<{self.qualname}({inner})>"


_RECORDED: Dict[str, type] = {}


def recorded_class(module: str, name: str) -> type:
    """The ``Recorded`` subclass standing in for ``module.name`` (one per name)."""
    qualname = f"{module}.{name}"
    if qualname not in _RECORDED:
        _RECORDED[qualname] = type(name, (Recorded,), {"qualname": qualname, "__module__": __name__})
    return _RECORDED[qualname]


# What torch.save files need besides their tensor storages (which torch resolves itself).
TORCH_TENSORS: Dict[Name, Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
}
for _dtype_name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
                    "float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _dtype_name):
        TORCH_TENSORS[("torch", _dtype_name)] = getattr(torch, _dtype_name)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from ``allowed`` (or ``stand_in``)."""

    def __init__(self, file: IO[bytes], allowed: Mapping[Name, Any], stand_in: Optional[StandIn] = None,
                 source: str = "pickle", **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._stand_in = stand_in
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if self._stand_in is not None:
            found = self._stand_in(module, name)
            if found is not None:
                return found
        raise RefusedPickle(
            f"{self._source}: refused to load {module}.{name}; only plain data, tensors and known "
            "classes are read from pickles here (nothing in the file is executed). If the file is "
            "trusted and from a newer format, report the name so it can be added as a stand-in."
        )


def restricted_loads(data: Union[bytes, IO[bytes]], allowed: Mapping[Name, Any],
                     stand_in: Optional[StandIn] = None, source: str = "pickle") -> Any:
    """Unpickle ``data`` (bytes or a binary file) allowing only the names in ``allowed``."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return RestrictedUnpickler(stream, allowed, stand_in, source).load()


def _pickle_module(allowed: Mapping[Name, Any], stand_in: Optional[StandIn], source: str):
    """A stand-in for the ``pickle`` module as ``torch.load(pickle_module=...)`` uses it."""

    class Unpickler(RestrictedUnpickler):
        def __init__(self, file, **kwargs) -> None:
            super().__init__(file, allowed, stand_in, source, **kwargs)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return type("restricted_pickle", (), {"Unpickler": Unpickler, "load": staticmethod(load),
                                          "__name__": "restricted_pickle"})


def restricted_torch_load(file: Union[str, bytes, IO[bytes]], allowed: Mapping[Name, Any],
                          stand_in: Optional[StandIn] = None, source: Optional[str] = None) -> Any:
    """``torch.load`` of a ``torch.save`` file (path, bytes or binary file) onto the CPU
    with every global except tensor storages resolved through ``allowed`` / ``stand_in``."""
    where = source or (file if isinstance(file, str) else "torch.save data")
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(file)
    names = dict(TORCH_TENSORS)
    names.update(allowed)
    # weights_only=False only selects the caller's pickle module: torch's own safe
    # unpickler has no stand-ins; ours refuses every name outside the map just the same.
    return torch.load(file, map_location="cpu", pickle_module=_pickle_module(names, stand_in, where),
                      weights_only=False)


def _numpy_array_globals() -> list:
    """What a pickled NumPy array names (the NumPy RNG state holds one): its rebuild function
    under the module name of NumPy 2 and of NumPy 1, its class, ``np.dtype`` and the dtype classes."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    rebuild = multiarray.multiarray._reconstruct
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [(rebuild, "numpy._core.multiarray._reconstruct"), (rebuild, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype] + dtype_classes


def load_weights_only(file: Union[str, IO[bytes]]) -> Any:
    """``torch.load`` onto the CPU with torch's weights-only unpickler, allowing besides tensors
    and plain containers what our own files hold: an ``argparse.Namespace`` (a run's arguments)
    and NumPy arrays (the NumPy RNG state). Anything else a file names is refused, so a crafted
    file cannot run code (``pickle.UnpicklingError``)."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace] + _numpy_array_globals()):
        return torch.load(file, map_location="cpu", weights_only=True)
