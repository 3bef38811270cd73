"""Optional compiled loop for the blending indices (the pure-Python loop is the reference).

Megatron compiles its C++ dataset helpers on first use; likewise, when a C compiler is
available this module compiles a ~30-line C loop once per user into a cache directory
(``$MEGATRON_CACHE_DIR``, else ``$XDG_CACHE_HOME/megatron-core`` or ``~/.cache/megatron-core``;
written to a temporary name and renamed, so concurrent ranks are safe) and loads it with
ctypes. Floating-point contraction is disabled so each ``w * k - count`` is rounded exactly
as the Python loop (and Megatron's helper) rounds it. Without a compiler, or with
``MEGATRON_NO_COMPILED_HELPERS=1``, ``load()`` returns None and callers use Python.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import numpy

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>

/* Greedy interleave: position k goes to the dataset with the largest
   weight * max(k, 1) - count (the first on ties). */
void blend(int16_t *choice, int64_t *sample, const double *weights, int32_t n, int64_t size,
           int64_t *counts) {
    for (int64_t k = 0; k < size; ++k) {
        double kd = k > 1 ? (double)k : 1.0;
        int32_t best = 0;
        double best_err = weights[0] * kd - (double)counts[0];
        for (int32_t i = 1; i < n; ++i) {
            double err = weights[i] * kd - (double)counts[i];
            if (err > best_err) { best = i; best_err = err; }
        }
        choice[k] = (int16_t)best;
        sample[k] = counts[best];
        counts[best] += 1;
    }
}

/* The same rule over the datasets not yet used up; draws exactly sizes[i] from each. */
void blend_exhaustive(int16_t *choice, int64_t *sample, const double *weights, int32_t n,
                      const int64_t *sizes, int64_t total, int64_t *counts) {
    for (int64_t k = 0; k < total; ++k) {
        double kd = k > 1 ? (double)k : 1.0;
        int32_t best = -1;
        double best_err = 0.0;
        for (int32_t i = 0; i < n; ++i) {
            if (counts[i] >= sizes[i]) continue;
            double err = weights[i] * kd - (double)counts[i];
            if (best < 0 || err > best_err) { best = i; best_err = err; }
        }
        choice[k] = (int16_t)best;
        sample[k] = counts[best];
        counts[best] += 1;
    }
}
"""

_FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded = {"done": False, "lib": None}

_I16 = numpy.ctypeslib.ndpointer(numpy.int16, flags="C_CONTIGUOUS")
_I64 = numpy.ctypeslib.ndpointer(numpy.int64, flags="C_CONTIGUOUS")
_F64 = numpy.ctypeslib.ndpointer(numpy.float64, flags="C_CONTIGUOUS")


def _cache_dir() -> str:
    if os.environ.get("MEGATRON_CACHE_DIR"):
        return os.environ["MEGATRON_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron-core")


def _compile(target: str) -> None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError("no C compiler found")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        src = os.path.join(tmp, "blend.c")
        with open(src, "w") as f:
            f.write(_SOURCE)
        out = os.path.join(tmp, "blend.so")
        subprocess.run([compiler, *_FLAGS, src, "-o", out], check=True, capture_output=True, timeout=120)
        os.replace(out, target)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.blend.argtypes = [_I16, _I64, _F64, ctypes.c_int32, ctypes.c_int64, _I64]
    lib.blend.restype = None
    lib.blend_exhaustive.argtypes = [_I16, _I64, _F64, ctypes.c_int32, _I64, ctypes.c_int64, _I64]
    lib.blend_exhaustive.restype = None
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The compiled loops, or None where they cannot be built (logged once)."""
    with _lock:
        if _loaded["done"]:
            return _loaded["lib"]
        _loaded["done"] = True
        if os.environ.get("MEGATRON_NO_COMPILED_HELPERS") == "1":
            logger.info("blending indices: Python loop (MEGATRON_NO_COMPILED_HELPERS=1)")
            return None
        digest = hashlib.md5((_SOURCE + " ".join(_FLAGS)).encode(), usedforsecurity=False).hexdigest()[:16]
        target = os.path.join(_cache_dir(), f"blending_{digest}.so")
        try:
            if not os.path.isfile(target):
                _compile(target)
            _loaded["lib"] = _bind(ctypes.CDLL(target))
            logger.info("blending indices: compiled loop %s", target)
        except (OSError, subprocess.SubprocessError, AttributeError) as err:
            logger.info("blending indices: Python loop (compiled helper unavailable: %s)", err)
        return _loaded["lib"]


def blend(weights, size: int):
    """(choice int16, sample int64) from the compiled loop; None when it is unavailable."""
    lib = load()
    if lib is None:
        return None
    choice = numpy.empty(size, dtype=numpy.int16)
    sample = numpy.empty(size, dtype=numpy.int64)
    w = numpy.ascontiguousarray(weights, dtype=numpy.float64)
    lib.blend(choice, sample, w, len(w), size, numpy.zeros(len(w), dtype=numpy.int64))
    return choice, sample


def blend_exhaustive(weights, sizes):
    """Exhaustive variant of ``blend``; None when the compiled loop is unavailable."""
    lib = load()
    if lib is None:
        return None
    sizes = numpy.ascontiguousarray(sizes, dtype=numpy.int64)
    total = int(sizes.sum())
    choice = numpy.empty(total, dtype=numpy.int16)
    sample = numpy.empty(total, dtype=numpy.int64)
    w = numpy.ascontiguousarray(weights, dtype=numpy.float64)
    lib.blend_exhaustive(choice, sample, w, len(w), sizes, total, numpy.zeros(len(w), dtype=numpy.int64))
    return choice, sample
