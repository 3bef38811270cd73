"""Text generation over the project's models.

- ``contexts``: key/value caches the attention layers read and extend during generation,
  and the recurrent states of Mamba layers;
- ``sampling_params`` / ``sampling``: how the next token is chosen;
- ``inference_request``: one request and its result;
- ``model_step``: one forward of a (tensor/pipeline parallel) model over new tokens;
- ``engines``: the loop that turns a batch of prompts into generated tokens.

The application servers (Megatron's ``PUT /api``, the OpenAI-compatible routes) live in
``megatron.inference``; this package knows token ids only, never text, except through a
``detokenize`` callable used for stop strings.
"""

from megatron.core.inference.contexts import DynamicInferenceContext, StaticInferenceContext
from megatron.core.inference.engines import DynamicInferenceEngine, StaticInferenceEngine
from megatron.core.inference.inference_request import GenerationResult, InferenceRequest
from megatron.core.inference.sampling_params import SamplingParams

__all__ = [
    "DynamicInferenceContext", "DynamicInferenceEngine", "GenerationResult", "InferenceRequest", "SamplingParams",
    "StaticInferenceContext", "StaticInferenceEngine",
]
