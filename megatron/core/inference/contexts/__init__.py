"""Key/value caches for generation (the ``inference_context`` argument of the models)."""

from megatron.core.inference.contexts.static_context import StaticInferenceContext

__all__ = ["StaticInferenceContext"]
