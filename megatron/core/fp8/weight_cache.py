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

With --fp8-param-gather the cache is fed by the distributed optimizer's FP8 all-gather
(``fp8.param_gather``): after each gather it ``put``s the gathered FP8 weight, and the
linears find it under the same key rules; a miss (a weight written since, or no gather
yet) falls back to quantizing the high-precision weight.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

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
        self._weight = None

    @staticmethod
    def _key_of(weight: torch.Tensor):
        return (weight.data_ptr(), weight._version, _generation, weight.shape)

    def get(self, weight: torch.Tensor, build: Callable[[], Any]) -> Any:
        key = self._key_of(weight)
        if self._entry is None or key != self._key:
            self._entry, self._key = build(), key
        return self._entry

    def put(self, weight: torch.Tensor, entry: Any) -> None:
        """Hold ``entry`` as the FP8 copies of ``weight`` as it is now (after the FP8
        parameter all-gather wrote it): valid until the weight or the generation changes."""
        self._entry, self._key = entry, self._key_of(weight)
        self._weight = weakref.ref(weight)

    def current(self) -> Optional[Any]:
        """The entry last ``put``, if the weight it was put for is unchanged since; else None."""
        weight = self._weight() if self._weight is not None else None
        if weight is None or self._entry is None or self._key != self._key_of(weight):
            return None
        return self._entry

    def clear(self) -> None:
        self._entry, self._key, self._weight = None, None, None
