"""Key/value caches for generation (the ``inference_context`` argument of the models).

A context is what attention layers see during generation: ``attend(layer_number, query,
key, value, core_attention)`` stores the new keys/values and attends over the cached
ones; ``rotary_freqs(rotary_pos_emb, seq_len, device)`` gives the new tokens' angles.
Mamba layers keep their recurrent states in ``recurrent_states`` and ask
``recurrent_segments(seq_len)`` which sequence each run of new tokens belongs to.
"""

from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext, OutOfBlocksError
from megatron.core.inference.contexts.static_context import StaticInferenceContext

__all__ = ["DynamicInferenceContext", "OutOfBlocksError", "StaticInferenceContext"]
