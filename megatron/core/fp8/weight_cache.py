"""The FP8 copies of a weight, kept from one micro-batch to the next.

The weights do not change between the micro-batches of one optimizer step, so quantizing
them (an amax pass, a cast and a transposed cast over every weight) once per step instead
of once per micro-batch saves that work on all micro-batches but the first, as Transformer
Engine does with its first-micro-batch flag. A cached copy is used only while both hold:

- the weight's version counter is unchanged (any in-place write to the parameter, e.g. a
  plain ``torch.optim`` step or ``load_state_dict``, bumps it), and
- no optimizer step has happened since (``weights_updated()``, called by the project's
  optimizers after they write the parameters; the distributed optimizer's all-gather
  writes them through a buffer, which the version counter may not see).

A loop that changes the weights some other way calls ``weights_updated()`` itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_generation = 0


def weights_updated() -> None:
    """Mark every cached FP8 weight stale (called after each optimizer step)."""
    global _generation
    _generation += 1


class Fp8WeightCache:
    """One linear's cached FP8 weight (``scaling.Fp8Operand``: W and W^T quantized) and
    the state it was built from."""

    def __init__(self) -> None:
        self._entry = None
        self._key = None

    def get(self, weight: torch.Tensor, build: Callable[[], Any]) -> Any:
        key = (weight.data_ptr(), weight._version, _generation, weight.shape)
        if self._entry is None or key != self._key:
            self._entry, self._key = build(), key
        return self._entry

    def clear(self) -> None:
        self._entry, self._key = None, None
