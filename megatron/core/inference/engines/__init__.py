"""Generation loops over a model: ``StaticInferenceEngine`` (one fixed batch at a time) and
``DynamicInferenceEngine`` (continuous batching over a paged KV cache)."""

from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
from megatron.core.inference.engines.static_engine import StaticInferenceEngine

__all__ = ["DynamicInferenceEngine", "StaticInferenceEngine"]
