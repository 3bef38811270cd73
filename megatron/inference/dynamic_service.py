"""Continuous batching behind the service interface (--inference-dynamic-batching).

One background thread owns the ``DynamicInferenceEngine`` and loops: take the prompts of
newly arrived HTTP requests into the running batch, cancel those whose clients went away,
run one engine step, hand finished results back. A request's prompts therefore join the
batch while other requests are mid-generation, instead of waiting for them to finish.
One rank only (no tensor/pipeline parallelism yet).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron.core.inference import DynamicInferenceEngine, GenerationResult, InferenceRequest
from megatron.inference.text_service import ServingLimits, TextGenerationService

logger = logging.getLogger(__name__)


class _Job:
    """The prompts of one HTTP request, and where their results go."""

    def __init__(self, requests, on_token, cancelled):
        self.requests = list(requests)
        self.on_token = on_token
        self.cancelled = cancelled
        self.results: List[Optional[GenerationResult]] = [None] * len(self.requests)
        self.ids: List[int] = []
        self.error: Optional[BaseException] = None
        self.finished = threading.Event()


class DynamicGenerationService(TextGenerationService):
    """``generate`` blocks its caller until its requests finish in the shared running batch."""

    def __init__(self, engine: DynamicInferenceEngine, tokenizer, limits: ServingLimits, model_name: str = "megatron"):
        super().__init__(engine, tokenizer, limits, model_name=model_name)
        self._arrivals: "queue.Queue[_Job]" = queue.Queue()
        self._owner: Dict[int, Tuple[_Job, int]] = {}
        engine.on_token = self._token
        threading.Thread(target=self._loop, daemon=True, name="dynamic-batching").start()

    def generate(self, requests: List[InferenceRequest], on_token: Optional[Callable[[int, int], None]] = None,
                 cancelled: Optional[Callable[[], Sequence[bool]]] = None) -> List[GenerationResult]:
        job = _Job(requests, on_token, cancelled)
        with self._counter_lock:
            self.active_requests += 1
        try:
            self._arrivals.put(job)
            job.finished.wait()
        finally:
            with self._counter_lock:
                self.active_requests -= 1
        if job.error is not None:
            raise job.error
        if any(r.finish_reason == "cancelled" for r in job.results):
            with self._counter_lock:
                self.cancelled_requests += 1
        return list(job.results)

    def _token(self, request_id: int, token: int) -> None:
        job, index = self._owner[request_id]
        if job.on_token is not None:
            job.on_token(index, token)

    def _admit(self, block: bool) -> None:
        try:
            job = self._arrivals.get(block=block)
        except queue.Empty:
            return
        while True:
            try:
                for index, request in enumerate(job.requests):
                    request_id = self.engine.add_request(request)
                    job.ids.append(request_id)
                    self._owner[request_id] = (job, index)
            except ValueError as err:  # checked by the routes already; never leave a caller waiting
                for request_id in job.ids:
                    self.engine.cancel(request_id)
                job.error = err
                job.finished.set()
            try:
                job = self._arrivals.get_nowait()
            except queue.Empty:
                return

    def _cancel(self) -> None:
        jobs = {id(job): job for job, _ in self._owner.values() if job.cancelled is not None}
        for job in jobs.values():
            for request_id, flag in zip(job.ids, job.cancelled()):
                if flag:
                    self.engine.cancel(request_id)

    def _loop(self) -> None:
        while True:
            self._admit(block=not self.engine.has_unfinished_requests())
            self._cancel()
            try:
                finished = self.engine.step()
            except Exception as err:  # fail the callers of this batch, keep serving the next ones
                logger.exception("dynamic batching step failed")
                for job, _ in list(self._owner.values()):
                    job.error = err
                    job.finished.set()
                self._owner.clear()
                self.engine.abort_all()
                continue
            for request_id, result in finished:
                job, index = self._owner.pop(request_id)
                job.results[index] = result
                if job.error is None and all(r is not None for r in job.results):
                    job.finished.set()
