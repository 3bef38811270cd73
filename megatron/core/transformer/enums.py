"""Enumerations shared by transformer modules (names follow Megatron-Core)."""

import enum


class ModelType(enum.Enum):
    """Overall model layout, used by pipeline schedules to pick tensor shapes."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2


class LayerType(enum.Enum):
    """Kind of block a layer belongs to."""

    encoder = 1
    decoder = 2


class AttnType(enum.Enum):
    """Where keys and values come from."""

    self_attn = 1
    cross_attn = 2


class AttnMaskType(enum.Enum):
    """How the attention mask is formed.

    padding: only the explicit mask; causal: lower-triangular (an explicit mask, if
    given, is combined with it); no_mask: attend everywhere; padding_causal: both;
    arbitrary: only the explicit mask, which may have any pattern.
    """

    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4
    arbitrary = 5


class AttnBackend(enum.Enum):
    """Core attention implementation requested with --attention-backend."""

    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5
    sdpa = 6
