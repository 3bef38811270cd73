"""``IdentityOp`` / ``IdentityFuncOp``: the placeholders Megatron-Core layer specs use for a
submodule that is absent (no q/k layernorm, no cross attention)."""

import torch


class IdentityOp(torch.nn.Module):
    """Returns its first input unchanged; accepts (and ignores) any constructor arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x, *args, **kwargs):
        return x


class IdentityFuncOp(IdentityOp):
    """Built, it gives a function that returns its first input (for fused-op slots)."""

    def forward(self, *args, **kwargs):
        return super().forward
