"""Generation loops over a model (``StaticInferenceEngine``: one fixed batch at a time)."""

from megatron.core.inference.engines.static_engine import StaticInferenceEngine

__all__ = ["StaticInferenceEngine"]
