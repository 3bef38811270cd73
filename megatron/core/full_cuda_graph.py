"""The forward and backward of a whole training step as one CUDA graph
(``--cuda-graph-impl full_iteration``).

A small model's step launches thousands of short kernels, and the host spends longer issuing
each one than the GPU spends running it: the GPU waits. Captured once and replayed, the
step's forward and backward over all its micro-batches cost the host one launch.

What a replay needs, and how it is arranged here:

- Fixed inputs. The step's micro-batches are read from the data iterator first and copied
  into device buffers that the graph reads; ``forward_step_func`` gets an iterator over
  those buffers, so its ``get_batch`` runs unchanged (the copy to the device is a no-op).
- No host work inside. What Python decides during capture is frozen into the graph, so the
  gradient hooks must not launch reductions (the data-parallel reduction runs after the
  replay, in ``finalize_model_grads``), pending parameter all-gathers are finished before
  the replay, and the model must not wait on the GPU (capture fails, naming the operation).
- Random numbers. The tracker's generators are registered with the graph, so every replay
  draws fresh dropout masks: the ones an eager step would draw.
- Outputs. The loss reports live in the graph's memory; each replay's are copied out.
- FP8. The scaling state (amax history, scales) lives on the device and the scales are
  derived there, so replays quantize as eager steps do; the FP8 weight cache is cleared
  before the capture, so the graph holds the once-per-step quantization of the weights.

Warm-up steps (``warmup_steps``) run eagerly on the capture stream first, so that lazy
initialization, autotuning and compilation happen outside the capture. Evaluation (forward
only) stays eager. Another number of micro-batches (batch-size ramp-up, a batch-size
schedule) replaces the graph with a new capture: one graph, one memory pool at a time.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional

import torch

from megatron.core.fp8.weight_cache import weights_updated
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

logger = logging.getLogger(__name__)


def _to_device(value: Any) -> Any:
    """A device copy of one micro-batch (a tensor, or dicts/lists/tuples of them)."""
    if torch.is_tensor(value):
        return value.to(torch.cuda.current_device(), copy=True)
    if isinstance(value, dict):
        return {key: _to_device(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item) for item in value)
    return value


def _copy_into(buffer: Any, value: Any, where: str) -> None:
    """Copy a new micro-batch into the buffers of the captured one; it must have its structure."""
    if torch.is_tensor(buffer):
        if not torch.is_tensor(value) or value.shape != buffer.shape or value.dtype != buffer.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if torch.is_tensor(value) else type(value).__name__
            raise ValueError(
                f"--cuda-graph-impl full_iteration: micro-batch field {where} is {got}, the captured step "
                f"read {tuple(buffer.shape)} {buffer.dtype}; a CUDA graph replays fixed shapes. Fix: give "
                "every micro-batch the same shapes (fixed --seq-length and --micro-batch-size) or drop "
                "--cuda-graph-impl"
            )
        buffer.copy_(value, non_blocking=True)
    elif isinstance(buffer, dict):
        if not isinstance(value, dict) or value.keys() != buffer.keys():
            raise ValueError(f"--cuda-graph-impl full_iteration: micro-batch {where} changed its fields")
        for key in buffer:
            _copy_into(buffer[key], value[key], f"{where}[{key!r}]")
    elif isinstance(buffer, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(buffer):
            raise ValueError(f"--cuda-graph-impl full_iteration: micro-batch {where} changed its length")
        for i, (b, v) in enumerate(zip(buffer, value)):
            _copy_into(b, v, f"{where}[{i}]")
    elif buffer != value:
        raise ValueError(
            f"--cuda-graph-impl full_iteration: micro-batch field {where} is {value!r}, the captured step read "
            f"{buffer!r}; only tensors may change between replays. Fix: drop --cuda-graph-impl"
        )


def _clone_reports(reports: List[Any]) -> List[Any]:
    """Copies of the loss reports, so the next replay does not overwrite what was returned."""
    def clone(value):
        if torch.is_tensor(value):
            return value.clone()
        if isinstance(value, dict):
            return {key: clone(item) for key, item in value.items()}
        return value

    return [clone(report) for report in reports]


class CudaGraphCaptureError(RuntimeError):
    """The step could not be captured: something in it waits on the GPU or is not allowed
    while a CUDA graph is recorded. The message names the operation as CUDA reported it."""


class _DeferredFinalize:
    """Stands in for ``finalize_model_grads_func`` inside the captured step: it records what
    the schedule passes (the token count is a tensor the replays refresh) and the real
    reduction runs after the replay, outside the graph."""

    def __init__(self) -> None:
        self.called_with: Optional[tuple] = None

    def __call__(self, models, num_tokens) -> None:
        self.called_with = (models, num_tokens)

    def run(self, finalize: Optional[Callable]) -> None:
        if finalize is not None and self.called_with is not None:
            finalize(*self.called_with)


class _CapturedStep:
    def __init__(self, num_microbatches: int, graph, batches, reports, deferred: _DeferredFinalize) -> None:
        self.num_microbatches = num_microbatches
        self.graph, self.batches, self.reports, self.deferred = graph, batches, reports, deferred


class FullIterationCudaGraph:
    """``forward_backward_func`` (a schedule of ``megatron.core.pipeline_parallel``) with
    training steps replayed from a CUDA graph after ``warmup_steps`` eager ones.

    Called like the schedule (keyword arguments). Each model chunk that has them gets
    ``defer_grad_reduction()`` (DDP) and ``finish_param_sync()`` before its step.
    """

    def __init__(self, forward_backward_func: Callable, warmup_steps: int = 3) -> None:
        if not torch.cuda.is_available():
            raise ValueError("--cuda-graph-impl full_iteration needs a CUDA GPU. Fix: drop --cuda-graph-impl on CPU")
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise ValueError(
                f"--cuda-graph-impl full_iteration needs PyTorch with CUDAGraph.register_generator_state "
                f"(this is {torch.__version__}). Fix: upgrade PyTorch or drop --cuda-graph-impl"
            )
        self.forward_backward_func = forward_backward_func
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.captured: Optional[_CapturedStep] = None
        self._stream: Optional[torch.cuda.Stream] = None
        self._prepared = set()

    def __call__(self, *, forward_step_func, data_iterator, model, num_microbatches: int,
                 forward_only: bool = False, finalize_model_grads_func: Optional[Callable] = None, **kwargs):
        call = dict(kwargs, forward_step_func=forward_step_func, model=model, num_microbatches=num_microbatches)
        if forward_only or data_iterator is None:
            return self.forward_backward_func(data_iterator=data_iterator, forward_only=forward_only,
                                              finalize_model_grads_func=finalize_model_grads_func, **call)
        models = model if isinstance(model, list) else [model]
        self._prepare(models)
        iterator = data_iterator[0] if isinstance(data_iterator, list) else data_iterator
        batches = [next(iterator) for _ in range(num_microbatches)]
        captured = self.captured
        if captured is not None and captured.num_microbatches == num_microbatches:
            for i, (buffer, batch) in enumerate(zip(captured.batches, batches)):
                _copy_into(buffer, batch, f"{i}")
            captured.graph.replay()
            captured.deferred.run(finalize_model_grads_func)
            return _clone_reports(captured.reports)
        device_batches = [_to_device(batch) for batch in batches]
        deferred = _DeferredFinalize()

        def run():
            return self.forward_backward_func(data_iterator=iter(device_batches), forward_only=False,
                                              finalize_model_grads_func=deferred, **call)

        stream = self._capture_stream()
        if self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                reports = run()
            torch.cuda.current_stream().wait_stream(stream)
            deferred.run(finalize_model_grads_func)
            return reports
        if captured is not None:  # another number of micro-batches: free the old graph's pool first
            self.captured = None
            captured.graph.reset()
            del captured
        graph = torch.cuda.CUDAGraph()
        for generator in get_cuda_rng_tracker().graph_generators():
            graph.register_generator_state(generator)
        logger.info("capturing the forward-backward of %d micro-batch(es) as one CUDA graph", num_microbatches)
        # FP8 weights are quantized once per step and then reused from a cache: the capture
        # must record the quantization (which every replay then repeats on the new weights),
        # not a hit on a copy made by an eager step.
        weights_updated()
        try:
            # thread_local: the data loader's pin-memory thread may keep calling CUDA meanwhile.
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                reports = run()
        except RuntimeError as err:
            raise CudaGraphCaptureError(
                "--cuda-graph-impl full_iteration: the training step could not be captured as a CUDA graph "
                f"({str(err).splitlines()[0]}); an operation of this model waits on the GPU or is not allowed "
                "during a capture. Fix: drop --cuda-graph-impl (the step then runs eagerly)"
            ) from err
        self.captured = _CapturedStep(num_microbatches, graph, device_batches, reports, deferred)
        graph.replay()
        deferred.run(finalize_model_grads_func)
        return _clone_reports(reports)

    def _capture_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _prepare(self, models) -> None:
        for chunk in models:
            if id(chunk) not in self._prepared and hasattr(chunk, "defer_grad_reduction"):
                chunk.defer_grad_reduction()
                self._prepared.add(id(chunk))
            if hasattr(chunk, "finish_param_sync"):
                chunk.finish_param_sync()
