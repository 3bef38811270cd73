"""A function that runs compiled by ``torch.compile`` on CUDA and eagerly elsewhere.

The compiled function is built lazily, on the first call that wants it, so importing the
model costs nothing and CPU-only runs never start the compiler. Compilation specializes
on shapes first and turns a dimension dynamic when it sees it change (``dynamic=None``),
which suits training (fixed shapes) and still bounds recompiles for evaluation or MoE.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

_force_on_cpu = threading.local()


@contextlib.contextmanager
def force_compiled_on_cpu(backend: str = "inductor"):
    """Inside this block compiled regions compile for CPU tensors too, with ``backend``
    (tests use it to check the compiled code against the reference without a GPU;
    "aot_eager" checks the traced forward and generated backward without paying for
    C++ code generation)."""
    previous = getattr(_force_on_cpu, "value", None)
    _force_on_cpu.value = backend
    try:
        yield
    finally:
        _force_on_cpu.value = previous


def _wants_compiled(args) -> bool:
    if torch.compiler.is_compiling():
        # Already inside an outer torch.compile: let it trace the eager body and fuse
        # across our boundary instead of nesting a second compiled function.
        return False
    if getattr(_force_on_cpu, "value", None):
        return True
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


class CompiledRegion:
    """``region(*args)``: ``fn(*args)``, compiled when a tensor argument is on CUDA.

    ``fn`` must be a pure tensor function (its non-tensor arguments become compile-time
    constants, so pass only a few distinct values of them).
    """

    def __init__(self, fn: Callable, name: Optional[str] = None, dynamic: Optional[bool] = None):
        self.fn = fn
        self.name = name or fn.__name__
        self.dynamic = dynamic
        self._compiled: dict = {}

    def compiled(self, backend: str = "inductor") -> Callable:
        """The function compiled with ``backend``, built on first use."""
        if backend not in self._compiled:
            logger.info("fused region %s: compiling with torch.compile (%s) on first use", self.name, backend)
            self._compiled[backend] = torch.compile(self.fn, dynamic=self.dynamic, backend=backend)
        return self._compiled[backend]

    def __call__(self, *args):
        if _wants_compiled(args):
            return self.compiled(getattr(_force_on_cpu, "value", None) or "inductor")(*args)
        return self.fn(*args)
