"""Fixtures of the fusion tests: force the compiled path on CPU.

``compiled`` uses inductor (the real code generator: C++ on CPU, Triton on CUDA), which
costs seconds per region on a small CPU, so each op has one inductor case; ``traced``
uses aot_eager (the same traced forward and generated backward, run eagerly) for the
other variants.
"""

import pytest

from megatron.core.fusions.compiled_region import force_compiled_on_cpu


@pytest.fixture
def compiled():
    with force_compiled_on_cpu("inductor"):
        yield


@pytest.fixture
def traced():
    with force_compiled_on_cpu("aot_eager"):
        yield
