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

``restricted_torch_load`` reads ``torch.save`` files (the zip format) with their tensors:
it opens the archive itself, reads tensor storages from its records, and every name the
pickle asks for goes through the map.
"""

from __future__ import annotations

import io
import pickle
import zipfile
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


class _TorchArchiveUnpickler(RestrictedUnpickler):
    """The restricted unpickler over the ``data.pkl`` of a ``torch.save`` zip archive: its
    persistent ids ``('storage', <torch.XStorage>, key, location, numel)`` are read from
    the archive's ``data/<key>`` records onto the CPU."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, allowed: Mapping[Name, Any],
                 stand_in: Optional[StandIn], source: str) -> None:
        super().__init__(archive.open(f"{prefix}data.pkl"), allowed, stand_in, source)
        self._archive, self._prefix = archive, prefix
        self._storages: Dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # A storage class only names the dtype of the bytes persistent_load reads.
        if module == "torch" and name.endswith("Storage") and (module, name) not in self._allowed:
            try:
                return torch.storage._get_dtype_from_pickle_storage_type(name)  # what torch.load does
            except KeyError:
                pass
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            info = self._archive.getinfo(f"{self._prefix}data/{key}")
            raw = torch.empty(info.file_size, dtype=torch.uint8)
            with self._archive.open(info) as record:
                record.readinto(raw.numpy())
            self._storages[key] = torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=dtype,
                                                             _internal=True)
        return self._storages[key]


def restricted_torch_load(file: Union[str, bytes, IO[bytes]], allowed: Mapping[Name, Any],
                          stand_in: Optional[StandIn] = None, source: Optional[str] = None) -> Any:
    """The object in a ``torch.save`` file (path, bytes or binary file; the zip format torch
    writes since 1.6), tensors on the CPU, with every global resolved through ``allowed`` /
    ``stand_in``. The archive is read here rather than by ``torch.load``, whose own safe
    unpickler has no stand-ins."""
    where = source or (file if isinstance(file, str) else "torch.save data")
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(file)
    names = dict(TORCH_TENSORS)
    names.update(allowed)
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise pickle.UnpicklingError(f"{where}: not a torch.save zip archive (files saved before PyTorch 1.6, "
                                     "or with _use_new_zipfile_serialization=False, are not read)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{where}: expected one <name>/data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
            raise pickle.UnpicklingError(f"{where}: tensors saved big-endian are not read")
        return _TorchArchiveUnpickler(archive, prefix, names, stand_in, where).load()


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
