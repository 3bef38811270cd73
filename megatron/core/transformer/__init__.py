from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["AttnMaskType", "ModelType", "TransformerConfig"]
