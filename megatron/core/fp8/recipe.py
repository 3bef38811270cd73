"""What an FP8 config asks for: formats per tensor role, the scaling recipe, and refusals.

Megatron's flags: ``--fp8-format {e4m3,hybrid}`` (``hybrid``: e4m3 for the forward tensors,
e5m2 for gradients), ``--fp8-recipe {delayed,tensorwise,mxfp8,blockwise,custom}``; only
``delayed`` and ``tensorwise`` are implemented (per-tensor scales, which Hopper's FP8 GEMM
takes); the others are refused with a message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_FORMATS = ("e4m3", "hybrid")
IMPLEMENTED_RECIPES = ("delayed", "tensorwise")
REFUSED_RECIPES = {
    "mxfp8": "MXFP8 needs Blackwell block-scaled GEMMs, which Hopper does not have",
    "blockwise": "block-wise scaling is not implemented",
    "custom": "custom quantizer factories are a Transformer Engine feature",
}
AMAX_COMPUTE_ALGOS = ("most_recent", "max")

# Which tensor of a linear each scaling slot belongs to.
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2
NUM_SLOTS = 3


@dataclass(frozen=True)
class Fp8Recipe:
    """The scaling recipe of the FP8 linears, from the config's fp8_* fields."""

    fmt: str = "hybrid"
    recipe: str = "delayed"
    margin: int = 0
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    wgrad: bool = True
    emulation: bool = False

    @classmethod
    def from_config(cls, config) -> "Fp8Recipe":
        return cls(fmt=config.fp8, recipe=config.fp8_recipe, margin=config.fp8_margin,
                   amax_history_len=config.fp8_amax_history_len,
                   amax_compute_algo=config.fp8_amax_compute_algo, wgrad=config.fp8_wgrad,
                   emulation=config.fp8_emulation)

    @property
    def forward_dtype(self) -> torch.dtype:
        """Activations and weights: e4m3 (more precision, range +-448)."""
        return torch.float8_e4m3fn

    @property
    def grad_dtype(self) -> torch.dtype:
        """Gradients: e5m2 (more range, +-57344) for hybrid, e4m3 for e4m3."""
        return torch.float8_e5m2 if self.fmt == "hybrid" else torch.float8_e4m3fn

    def dtype(self, slot: int) -> torch.dtype:
        return self.grad_dtype if slot == GRAD_OUTPUT else self.forward_dtype


def check_fp8_config(config) -> None:
    """Raise ValueError for an FP8 setting that cannot run here; no-op when fp8 is off."""
    if getattr(config, "fp8_param", False) and config.fp8 is None:
        raise ValueError("--fp8-param-gather keeps and gathers the FP8 linears' weights in FP8, so it needs FP8 "
                         "training: add --fp8-format hybrid (or e4m3), or drop --fp8-param-gather")
    if config.fp8 is None:
        return
    if config.fp8 not in FP8_FORMATS:
        raise ValueError(f"--fp8-format must be one of {FP8_FORMATS}, got {config.fp8!r}")
    if config.fp8_recipe in REFUSED_RECIPES:
        raise ValueError(
            f"--fp8-recipe {config.fp8_recipe} is not supported: {REFUSED_RECIPES[config.fp8_recipe]}; "
            "use --fp8-recipe delayed or tensorwise"
        )
    if config.fp8_recipe not in IMPLEMENTED_RECIPES:
        raise ValueError(f"--fp8-recipe must be delayed or tensorwise, got {config.fp8_recipe!r}")
    if config.fp8_amax_compute_algo not in AMAX_COMPUTE_ALGOS:
        raise ValueError(
            f"--fp8-amax-compute-algo must be most_recent or max, got {config.fp8_amax_compute_algo!r}"
        )
    if not isinstance(config.fp8_amax_history_len, int) or config.fp8_amax_history_len < 1:
        raise ValueError(f"--fp8-amax-history-len must be a positive integer, got {config.fp8_amax_history_len!r}")
    if not isinstance(config.fp8_margin, int) or config.fp8_margin < 0:
        raise ValueError(f"--fp8-margin must be a non-negative integer, got {config.fp8_margin!r}")
    for flag, value in (("--num-layers-at-start-in-bf16", config.num_layers_at_start_in_bf16),
                        ("--num-layers-at-end-in-bf16", config.num_layers_at_end_in_bf16)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{flag} must be a non-negative integer, got {value!r}")
    if config.first_last_layers_bf16 and (
            config.num_layers_at_start_in_bf16 + config.num_layers_at_end_in_bf16 > config.num_layers):
        raise ValueError(
            f"--num-layers-at-start-in-bf16 {config.num_layers_at_start_in_bf16} plus --num-layers-at-end-in-bf16 "
            f"{config.num_layers_at_end_in_bf16} exceed --num-layers {config.num_layers}: lower them"
        )
