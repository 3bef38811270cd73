"""``megatron.core.datasets.utils``: the import path Megatron-Core scripts use for ``Split``,
``get_blend_from_list``, ``normalize`` and ``compile_helpers``. Only re-exports (the code
lives in ``split.py`` and ``blend_spec.py``) and the no-op ``compile_helpers``."""

from __future__ import annotations

import logging

from megatron.core.datasets.blend_spec import get_blend_from_list
from megatron.core.datasets.split import Split, normalize

logger = logging.getLogger(__name__)

__all__ = ["Split", "compile_helpers", "get_blend_from_list", "normalize"]


def compile_helpers() -> None:
    """Megatron-Core compiles its C++ dataset helpers here; this package has none to
    compile (its index builders are NumPy), so this only logs that and returns."""
    logger.info("compile_helpers: nothing to compile (the dataset index builders here are NumPy, not C++)")
