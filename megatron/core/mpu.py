"""``megatron.core.mpu``: Megatron-Core's old name for ``parallel_state``, kept for scripts
that still import it. Every public accessor of ``parallel_state`` under the same name."""

from megatron.core import parallel_state as _parallel_state

_PREFIXES = ("get_", "set_", "is_", "initialize_", "destroy_", "model_parallel_")

globals().update({name: getattr(_parallel_state, name) for name in dir(_parallel_state)
                  if name.startswith(_PREFIXES) and callable(getattr(_parallel_state, name))})

__all__ = sorted(name for name in dir(_parallel_state)
                 if name.startswith(_PREFIXES) and callable(getattr(_parallel_state, name)))
