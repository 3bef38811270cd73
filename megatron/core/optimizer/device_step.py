"""An optimizer step's outcome kept on the device, and its asynchronous read-back.

A host read of a GPU value (``.item()``, ``float()``, ``bool()``) waits for everything
queued on the stream before it, not only for the value. A training step that reads its
grad norm or loss that way drains the GPU every iteration and leaves it idle while the
host prepares the next one. ``HostCopy`` instead queues one small copy to pinned host
memory behind the values and records an event; ``values()`` waits for that event only,
which is long done when it is asked for an iteration later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class DeviceStepResult:
    """``MegatronOptimizer.step_on_device()``'s triple, as 0-dim fp32 device tensors:
    ``found_inf`` 1 where the step was skipped (NaN/Inf grad norm), the grad norm before
    clipping, the zero count (--log-num-zeros-in-grad); None where the host step gives None."""

    found_inf: Optional[torch.Tensor]
    grad_norm: Optional[torch.Tensor]
    num_zeros: Optional[torch.Tensor]

    def scalars(self) -> Dict[str, torch.Tensor]:
        """The values that are set, by field name."""
        fields = {"found_inf": self.found_inf, "grad_norm": self.grad_norm, "num_zeros": self.num_zeros}
        return {name: value for name, value in fields.items() if value is not None}

    @staticmethod
    def as_host_triple(values: Dict[str, torch.Tensor]):
        """(update_successful, grad_norm, num_zeros) from ``scalars()`` read back to the host,
        in the types ``step()`` returns."""
        skipped = "found_inf" in values and float(values["found_inf"]) > 0
        grad_norm = float(values["grad_norm"]) if "grad_norm" in values else None
        num_zeros = int(values["num_zeros"]) if "num_zeros" in values else None
        return not skipped, grad_norm, num_zeros


class HostCopy:
    """0-dim device tensors copied to host memory behind the work that computes them.

    The copy is queued at construction (one packed fp32 tensor, one copy); ``values()``
    returns them as 0-dim fp32 CPU tensors, waiting for that copy alone. CPU tensors are
    taken as they are.
    """

    def __init__(self, scalars: Dict[str, torch.Tensor]) -> None:
        self.names = list(scalars)
        self._event = None
        if not self.names:
            self._host = torch.zeros(0)
            return
        packed = torch.stack([value.detach().reshape(()).float() for value in scalars.values()])
        if packed.is_cuda:
            # non_blocking into CPU memory: PyTorch gives the destination pinned memory, so
            # the copy runs asynchronously and the event says when it has landed.
            self._host = packed.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed

    def values(self) -> Dict[str, torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return {name: self._host[i] for i, name in enumerate(self.names)}
