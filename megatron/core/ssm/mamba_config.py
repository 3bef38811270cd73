"""The shape of the Mamba-2 mixer: Megatron's --mamba-* flags and its fixed mixer defaults."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass
class MambaConfig:
    """Mixer shape. The inner width is ``mamba_num_heads * mamba_head_dim`` when
    --mamba-num-heads is set, else ``expand * hidden_size`` (heads = inner / head dim)."""

    mamba_state_dim: int = 128
    """Dimension of the state of each SSM head (N)."""
    mamba_head_dim: int = 64
    """Channels per SSM head (P)."""
    mamba_num_groups: int = 8
    """Groups sharing one B and C (heads per group = heads / groups); like query groups in GQA."""
    mamba_num_heads: Optional[int] = None
    """SSM heads; default expand * hidden / --mamba-head-dim."""
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 128
    """Positions per chunk of the SSD scan's compile and reference backends (a speed knob; the
    result does not depend on it). The Triton kernels run their own (``ssd_triton.KERNEL_CHUNK``)."""
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: Tuple[float, float] = (0.0, float("inf"))
    A_init_range: Tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    """Epsilon of the mixer's gated RMSNorm (fixed at 1e-5 in Megatron's mixer)."""

    def inner_size(self, hidden_size: int) -> int:
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads * self.mamba_head_dim
        return self.expand * hidden_size

    def num_heads(self, hidden_size: int) -> int:
        inner = self.inner_size(hidden_size)
        if inner % self.mamba_head_dim:
            raise ValueError(
                f"--mamba-head-dim {self.mamba_head_dim} must divide the mixer width {inner} "
                f"({self.expand} x --hidden-size {hidden_size}): change --mamba-head-dim or set --mamba-num-heads"
            )
        return inner // self.mamba_head_dim

    def validate(self, hidden_size: int, tp_size: int = 1) -> None:
        """ValueError naming the flag when the shape cannot be built or split over ``tp_size``."""
        heads = self.num_heads(hidden_size)
        for flag, value in (("--mamba-state-dim", self.mamba_state_dim), ("--mamba-head-dim", self.mamba_head_dim),
                            ("--mamba-num-groups", self.mamba_num_groups)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if heads % self.mamba_num_groups:
            raise ValueError(
                f"--mamba-num-groups {self.mamba_num_groups} must divide the number of SSM heads {heads}: "
                "pick a divisor"
            )
        if self.mamba_num_groups % tp_size:
            raise ValueError(
                f"--mamba-num-groups {self.mamba_num_groups} must be divisible by --tensor-model-parallel-size "
                f"{tp_size}: tensor parallelism splits the groups (and their heads) over ranks"
            )
