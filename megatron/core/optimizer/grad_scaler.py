"""Loss scalers for fp16 training: constant, or dynamic with hysteresis (Megatron's rules).

The scale lives in a 1-element fp32 tensor on the training device so that unscaling
needs no host sync; ``update`` takes the already-synchronized ``found_inf`` flag.
"""

from __future__ import annotations

from typing import Optional

import torch


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class MegatronGradScaler:
    """Holds the loss scale; ``inv_scale`` unscales grads."""

    def __init__(self, initial_scale: float, device: Optional[torch.device] = None) -> None:
        if initial_scale <= 0.0:
            raise ValueError(f"the loss scale must be positive (--loss-scale/--initial-loss-scale), got {initial_scale}")
        self._scale = torch.tensor([float(initial_scale)], dtype=torch.float32, device=device or _default_device())

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return self._scale.double().reciprocal().float()

    def update(self, found_inf: bool) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        raise NotImplementedError


class ConstantGradScaler(MegatronGradScaler):
    """A fixed loss scale (--loss-scale)."""

    def update(self, found_inf: bool) -> None:
        """The scale never changes."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the scale comes from the command line."""


class DynamicGradScaler(MegatronGradScaler):
    """Dynamic loss scale.

    On a step with inf/nan grads: reset the growth count and decrement the hysteresis
    count; once it reaches 0, multiply the scale by ``backoff_factor`` (floored at
    ``min_scale``) on every further overflow. After ``growth_interval`` consecutive
    clean steps: multiply the scale by ``growth_factor`` and refill the hysteresis.
    """

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_factor: float,
        backoff_factor: float,
        growth_interval: int,
        hysteresis: int,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(initial_scale, device)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(
                f"--min-loss-scale {min_scale} must be positive and <= --initial-loss-scale {initial_scale}"
            )
        if growth_factor <= 1.0:
            raise ValueError(f"the loss-scale growth factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"the loss-scale backoff factor must be in (0, 1), got {backoff_factor}")
        if growth_interval <= 0:
            raise ValueError(f"--loss-scale-window must be positive, got {growth_interval}")
        if hysteresis <= 0:
            raise ValueError(f"--hysteresis must be positive, got {hysteresis}")
        self.min_scale = torch.tensor([float(min_scale)], dtype=torch.float32, device=self._scale.device)
        self.growth_factor = torch.tensor([float(growth_factor)], dtype=torch.float32, device=self._scale.device)
        self.backoff_factor = torch.tensor([float(backoff_factor)], dtype=torch.float32, device=self._scale.device)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._scale = state_dict["scale"].to(self._scale.device, torch.float32).reshape(1)
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])
