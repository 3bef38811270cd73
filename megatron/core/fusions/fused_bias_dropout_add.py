"""residual + dropout(x + bias) in one kernel, with a training and an eval variant.

``get_bias_dropout_add(training, fused)`` returns the function a transformer layer calls
(Megatron's signature: ``fn(x_with_bias, residual, prob)``). The eval variant has no
dropout at all, so it compiles to a plain add; the training variant draws its dropout
mask inside the kernel. Compiled on CUDA, the mask comes from the compiler's own random
stream (seeded from torch's default generator, so it is reproducible per seed and
identical across tensor-parallel ranks that share that seed) rather than from the eager
dropout kernel: the masks differ from the reference path's, their distribution does not.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core.fusions.compiled_region import CompiledRegion


def bias_dropout_add_reference(
    x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    """residual + dropout(x + bias); the sum takes the wider dtype (an fp32 residual stays fp32)."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


def _bias_dropout_add_train(x, bias, residual, prob: float):
    return bias_dropout_add_reference(x, bias, residual, prob, True)


def _bias_add_eval(x, bias, residual, prob: float):
    # prob is ignored: no dropout outside training (kept in the signature for a uniform call)
    return bias_dropout_add_reference(x, bias, residual, 0.0, False)


_train = CompiledRegion(_bias_dropout_add_train, "bias_dropout_add_train")
_eval = CompiledRegion(_bias_add_eval, "bias_add_eval")

BiasDropoutAdd = Callable[[Tuple[torch.Tensor, Optional[torch.Tensor]], torch.Tensor, float], torch.Tensor]


def _unfused(training: bool) -> BiasDropoutAdd:
    def bias_dropout_add(x_with_bias, residual, prob):
        x, bias = x_with_bias
        return bias_dropout_add_reference(x, bias, residual, prob, training)

    return bias_dropout_add


def _fused(training: bool) -> BiasDropoutAdd:
    region = _train if training else _eval

    def fused_bias_dropout_add(x_with_bias, residual, prob):
        x, bias = x_with_bias
        if training and prob == 0.0:
            # Dropout with p=0 is the identity: the eval kernel is the same math without
            # the random-number generation.
            return _eval(x, bias, residual, 0.0)
        return region(x, bias, residual, prob)

    return fused_bias_dropout_add


def get_bias_dropout_add(training: bool, fused: bool) -> BiasDropoutAdd:
    """``fn((x, bias or None), residual, prob) -> residual + dropout(x + bias)``.

    ``fused`` is the config's ``bias_dropout_fusion``; ``training`` selects the variant
    (dropout only in training).
    """
    return _fused(training) if fused else _unfused(training)
