"""``ModuleSpec`` / ``build_module``: Megatron-Core's way for scripts to say which module
class to build with which parameters, kept as plain data (no control flow in a spec).

    spec = ModuleSpec(module=torch.nn.Linear, params={"bias": False})
    layer = build_module(spec, 16, 32)          # torch.nn.Linear(16, 32, bias=False)

``module`` is a class, a function (returned as it is, not called), or an
``("package.module", "Name")`` pair imported when built. ``submodules``, when set, is
passed to the class as the ``submodules`` keyword.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from typing import Any, Tuple, Union


@dataclass
class ModuleSpec:
    """What to build: ``module`` with ``params`` (and ``submodules`` when not None)."""

    module: Union[type, types.FunctionType, Tuple[str, str]]
    params: dict = field(default_factory=dict)
    submodules: Any = None


def import_module(path: Tuple[str, str]) -> Any:
    """The object ``name`` of module ``module`` for a ``(module, name)`` pair."""
    module, name = path
    return getattr(importlib.import_module(module), name)


def get_module(spec_or_module: Union[ModuleSpec, type, Tuple[str, str]]) -> Any:
    """The class or function a spec (or a bare class / import pair) names."""
    target = spec_or_module.module if isinstance(spec_or_module, ModuleSpec) else spec_or_module
    return import_module(target) if isinstance(target, tuple) else target


def build_module(spec_or_module, *args, **kwargs):
    """An instance of what ``spec_or_module`` names, built with ``args``, the spec's
    ``params`` and ``kwargs`` (``kwargs`` win); functions are returned unbuilt."""
    target = get_module(spec_or_module)
    if isinstance(target, (types.FunctionType, types.BuiltinFunctionType)):
        return target
    if not isinstance(spec_or_module, ModuleSpec):
        return target(*args, **kwargs)
    merged = dict(spec_or_module.params)
    if spec_or_module.submodules is not None:
        merged["submodules"] = spec_or_module.submodules
    merged.update(kwargs)
    try:
        return target(*args, **merged)
    except TypeError as error:
        raise TypeError(f"building {getattr(target, '__name__', target)} from its ModuleSpec: {error}") from error
