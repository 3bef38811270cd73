"""residual + dropout(x + bias), and the norm of that sum, in one fused region.

A pre-norm transformer layer adds the attention output into the residual stream and at
once normalizes the new stream for the MLP; likewise the MLP's output and the next
layer's input norm. As two regions, the norm reads back the sum
the bias-dropout-add just wrote; in backward, autograd adds the norm's input gradient to
the residual stream's gradient in a kernel of its own before the bias-dropout-add's
backward reads that sum again. One region writes the sum and the normed output in one
pass, and its backward is one pass over the incoming gradients as well (plus the column
sums of the weight and bias gradients).

The math is exactly ``bias_dropout_add_reference`` followed by the norm's reference
(``fused_norms``); the random dropout mask follows the same rules as the
bias-dropout-add region's (the compiler's random stream on CUDA).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron.core.fusions.compiled_region import CompiledRegion
from megatron.core.fusions.fused_bias_dropout_add import bias_dropout_add_reference
from megatron.core.fusions.fused_norms import layer_norm_reference, rms_norm_reference


def bias_dropout_add_norm_reference(
    x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, prob: float, training: bool,
    weight: torch.Tensor, norm_bias: Optional[torch.Tensor], eps: float, zero_centered_gamma: bool, rms: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hidden, normed): hidden = residual + dropout(x + bias), normed = norm(hidden), the
    norm an RMSNorm when ``rms`` (``norm_bias`` then unused) and a LayerNorm otherwise."""
    hidden = bias_dropout_add_reference(x, bias, residual, prob, training)
    if rms:
        return hidden, rms_norm_reference(hidden, weight, eps, zero_centered_gamma)
    return hidden, layer_norm_reference(hidden, weight, norm_bias, eps, zero_centered_gamma)


def _train(x, bias, residual, prob, weight, norm_bias, eps, zero_centered_gamma, rms):
    return bias_dropout_add_norm_reference(x, bias, residual, prob, True, weight, norm_bias, eps,
                                           zero_centered_gamma, rms)


def _no_dropout(x, bias, residual, prob, weight, norm_bias, eps, zero_centered_gamma, rms):
    # prob is ignored (eval, or dropout 0): the same math without random numbers
    return bias_dropout_add_norm_reference(x, bias, residual, 0.0, False, weight, norm_bias, eps,
                                           zero_centered_gamma, rms)


_train_region = CompiledRegion(_train, "bias_dropout_add_norm_train")
_no_dropout_region = CompiledRegion(_no_dropout, "bias_add_norm")


def bias_dropout_add_norm(
    x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, prob: float, training: bool,
    weight: torch.Tensor, norm_bias: Optional[torch.Tensor], eps: float, zero_centered_gamma: bool, rms: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(residual + dropout(x + bias), norm(that))`` in one region (compiled on CUDA);
    the arguments as in ``bias_dropout_add_norm_reference``."""
    region = _train_region if training and prob > 0.0 else _no_dropout_region
    return region(x, bias, residual, prob, weight, norm_bias, eps, zero_centered_gamma, rms)
