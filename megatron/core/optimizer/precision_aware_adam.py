"""AdamW whose master params and moments are stored in lower precision, and optionally on
the CPU (--use-precision-aware-optimizer, --optimizer-cpu-offload).

The update itself is torch's AdamW, run in fp32: for each param the stored values are
expanded to fp32 temporaries, ``torch.optim.adamw.adamw`` steps them, and the results are
stored back. With every dtype fp32 and nothing offloaded the temporaries ARE the stored
tensors, so the step is torch.optim.AdamW's, bit for bit.

What is stored per param ``p`` (this rank's piece of a model param):

- ``exp_avg`` / ``exp_avg_sq`` in ``exp_avg_dtype`` / ``exp_avg_sq_dtype``;
- ``master_param`` in ``master_params_dtype``, only where a separate fp32 copy of ``p`` is
  needed: ``p`` is fp16/bf16, or ``p`` is offloaded (its values then live on the CPU);
  fp32 params on the device are updated in place.

Storage formats (the per-tensor scaling of Transformer Engine's FusedAdam, which Megatron
uses for this flag):

- fp32: as is; bf16: a plain round-to-nearest cast (bf16 has fp32's range);
- fp16 and fp8 (E4M3, ``torch.float8_e4m3fn``): the tensor is divided by a per-tensor fp32
  ``scale = absmax / max_range`` before the cast (max_range: half of fp16's largest value,
  448 for E4M3), and multiplied back when read. The scale is kept in the state as
  ``<name>_scale``.

Gradients are read from ``p.decoupled_grad`` when set (a grad whose dtype differs from the
param's, e.g. an fp32 grad piece of a bf16 param), else ``p.grad``; any float dtype.

Offloaded params (``offload``): master param and moments live on the CPU; each step copies
the grad to the CPU (into a reused, optionally pinned buffer), steps there and copies the
new values back into ``p``. With ``overlap_d2h_h2d`` on a GPU the copies run on side
streams: the CPU step of one param overlaps the copies of the next ones.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional

import torch
from torch.optim.adamw import adamw as adamw_step

logger = logging.getLogger(__name__)

FP8_STORAGE_DTYPE = torch.float8_e4m3fn

# Largest magnitude a scaled state may take in each storage format.
_MAX_RANGE = {torch.float16: torch.finfo(torch.float16).max / 2.0, FP8_STORAGE_DTYPE: 448.0}

STATE_NAMES = ("exp_avg", "exp_avg_sq")


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a state is stored in: Megatron's config spells fp8 as ``torch.uint8``."""
    return FP8_STORAGE_DTYPE if dtype in (torch.uint8, FP8_STORAGE_DTYPE) else dtype


def is_scaled(dtype: torch.dtype) -> bool:
    return storage_dtype(dtype) in _MAX_RANGE


def quantize(values: torch.Tensor, dtype: torch.dtype, out: torch.Tensor, scale: Optional[torch.Tensor]) -> None:
    """Store fp32 ``values`` into ``out`` (of ``storage_dtype(dtype)``), writing ``scale``
    in place for the scaled formats."""
    if not is_scaled(dtype):
        out.copy_(values)
        return
    absmax = values.abs().max() if values.numel() else values.new_zeros(())
    scale.copy_(absmax / _MAX_RANGE[storage_dtype(dtype)])
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    out.copy_((values * inv.to(values.device)).to(out.dtype))


def dequantize(stored: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 values of a stored state (the tensor itself when it is fp32)."""
    if stored.dtype == torch.float32:
        return stored
    values = stored.float()
    return values.mul_(scale) if scale is not None else values


class PrecisionAwareAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with low-precision and/or CPU-resident state.

    Args:
        params: params or param groups (as for torch.optim.AdamW).
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        master_params_dtype: torch.float32 or torch.float16 (scaled).
        exp_avg_dtype, exp_avg_sq_dtype: torch.float32, bfloat16, float16 (scaled) or
            uint8 / float8_e4m3fn (fp8 E4M3, scaled).
        pin_cpu_grads, pin_cpu_params: pin the CPU grad buffers / master params (only where
            an accelerator exists: pinning needs one).
        overlap_d2h_h2d: copy grads and params on side CUDA streams.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        master_params_dtype: torch.dtype = torch.float32,
        exp_avg_dtype: torch.dtype = torch.float32,
        exp_avg_sq_dtype: torch.dtype = torch.float32,
        pin_cpu_grads: bool = True,
        pin_cpu_params: bool = True,
        overlap_d2h_h2d: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if master_params_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"master params are stored in fp32 or fp16, not {master_params_dtype}")
        self.dtypes = {"master_param": master_params_dtype, "exp_avg": exp_avg_dtype, "exp_avg_sq": exp_avg_sq_dtype}
        self.offloaded: set = set()
        self._storage_ready = False
        can_pin = torch.cuda.is_available()
        self.pin_cpu_grads = pin_cpu_grads and can_pin
        self.pin_cpu_params = pin_cpu_params and can_pin
        self.overlap_d2h_h2d = overlap_d2h_h2d and can_pin
        self._cpu_grads: Dict[torch.Tensor, torch.Tensor] = {}

    def init_storage(self, offload: Iterable[torch.Tensor] = ()) -> None:
        """Create the master params, once the groups hold their final params (the
        distributed optimizer swaps in this rank's pieces first). ``offload``: params whose
        master param and moments live on the CPU. Drops any state."""
        self.offloaded = set(offload)
        self.state.clear()
        self._cpu_grads.clear()
        for group in self.param_groups:
            for p in group["params"]:
                if self.needs_master(p):
                    self._init_master(p)
        self._storage_ready = True

    # -- storage -------------------------------------------------------------------------

    def needs_master(self, p: torch.Tensor) -> bool:
        return p.dtype != torch.float32 or p in self.offloaded

    def state_device(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if p in self.offloaded else p.device

    def _new_stored(self, p: torch.Tensor, name: str, pin: bool = False) -> None:
        dtype = storage_dtype(self.dtypes[name])
        state = self.state[p]
        state[name] = torch.zeros(p.shape, dtype=dtype, device=self.state_device(p), pin_memory=pin)
        if is_scaled(dtype):
            state[f"{name}_scale"] = torch.zeros((), dtype=torch.float32, device=self.state_device(p))

    def _init_master(self, p: torch.Tensor) -> None:
        self._new_stored(p, "master_param", pin=self.pin_cpu_params and p in self.offloaded)
        self.set_unscaled(p, "master_param", p.detach().float())

    def _init_moments(self, p: torch.Tensor) -> None:
        state = self.state[p]
        # torch keeps Adam's step on the CPU unless the fused kernel reads it.
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if self._fused(p) else "cpu")
        for name in STATE_NAMES:
            self._new_stored(p, name)

    def get_unscaled(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """fp32 values of state ``name`` of ``p`` ("master_param", "exp_avg", "exp_avg_sq");
        on the state's device. A stored fp32 state is returned itself, not a copy."""
        state = self.state[p]
        return dequantize(state[name], state.get(f"{name}_scale"))

    def set_unscaled(self, p: torch.Tensor, name: str, values: torch.Tensor) -> None:
        """Store fp32 ``values`` as state ``name`` of ``p`` (created if missing)."""
        state = self.state[p]
        if name not in state:
            if name == "master_param":
                self._new_stored(p, name, pin=self.pin_cpu_params and p in self.offloaded)
            else:
                self._init_moments(p)
        stored = state[name]
        values = values.detach().to(device=stored.device, dtype=torch.float32).view_as(stored)
        if stored.dtype == torch.float32 and values.data_ptr() == stored.data_ptr():
            return
        quantize(values, self.dtypes[name], stored, state.get(f"{name}_scale"))

    def has_moments(self, p: torch.Tensor) -> bool:
        return "exp_avg" in self.state.get(p, {})

    def step_count(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        return self.state[p]["step"] if self.has_moments(p) else None

    def load_moments(self, p: torch.Tensor, values: Optional[Dict[str, torch.Tensor]], step) -> None:
        """Set the moments of ``p`` from fp32 ``values`` and Adam's ``step`` (a number or a
        tensor); ``values`` None drops them (the saved optimizer had not stepped)."""
        if values is None:
            for name in STATE_NAMES + ("step",):
                self.state[p].pop(name, None)
                self.state[p].pop(f"{name}_scale", None)
            return
        for name in STATE_NAMES:
            self.set_unscaled(p, name, values[name])
        step = float(step.item() if torch.is_tensor(step) else step)
        self.state[p]["step"].fill_(step)

    def reload_master_params(self) -> None:
        """Refresh every master param from its param (after the model weights were loaded)."""
        for group in self.param_groups:
            for p in group["params"]:
                if self.needs_master(p):
                    self.set_unscaled(p, "master_param", p.detach().float())

    # -- step ----------------------------------------------------------------------------

    @staticmethod
    def grad_of(p: torch.Tensor) -> Optional[torch.Tensor]:
        grad = getattr(p, "decoupled_grad", None)
        return grad if grad is not None else p.grad

    def _grad_on_state_device(self, p: torch.Tensor, grad: torch.Tensor, stream) -> torch.Tensor:
        if p not in self.offloaded or grad.device.type == "cpu":
            return grad
        buffer = self._cpu_grads.get(p)
        if buffer is None:
            buffer = torch.empty(grad.shape, dtype=grad.dtype, device="cpu", pin_memory=self.pin_cpu_grads)
            self._cpu_grads[p] = buffer
        if stream is None:
            buffer.copy_(grad)
            return buffer
        with torch.cuda.stream(stream):
            buffer.copy_(grad, non_blocking=True)
        return buffer

    def _prefetch_grads(self, params: List[torch.Tensor]) -> Dict[torch.Tensor, object]:
        """With overlap: start every offloaded grad's D2H copy now; one event per param."""
        if not self.overlap_d2h_h2d:
            return {}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        events = {}
        for p in params:
            grad = self.grad_of(p)
            if p in self.offloaded and grad is not None and grad.is_cuda:
                self._grad_on_state_device(p, grad, stream)
                events[p] = stream.record_event()
        return events

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("PrecisionAwareAdamW.step does not take a closure")
        if not self._storage_ready:
            self.init_storage()
        params = [p for group in self.param_groups for p in group["params"]]
        events = self._prefetch_grads(params)
        h2d = torch.cuda.Stream() if events else None
        for group in self.param_groups:
            for p in group["params"]:
                grad = self.grad_of(p)
                if grad is None:
                    continue
                if p in events:
                    events[p].synchronize()
                    grad = self._cpu_grads[p]
                else:
                    grad = self._grad_on_state_device(p, grad, None)
                self._step_param(p, grad, group, h2d)
        if h2d is not None:
            torch.cuda.current_stream().wait_stream(h2d)
        return None

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict, h2d) -> None:
        if not self.has_moments(p):
            self._init_moments(p)
        state = self.state[p]
        master = self.get_unscaled(p, "master_param") if self.needs_master(p) else p
        moments = [self.get_unscaled(p, name) for name in STATE_NAMES]
        beta1, beta2 = group["betas"]
        adamw_step(
            [master], [grad.float()], [moments[0]], [moments[1]], [], [state["step"]],
            foreach=False, fused=self._fused(p),
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )
        for name, values in zip(STATE_NAMES, moments):
            self.set_unscaled(p, name, values)
        if master is p:
            return
        self.set_unscaled(p, "master_param", master)
        if h2d is None or not p.is_cuda:
            p.copy_(master)
            return
        with torch.cuda.stream(h2d):
            p.copy_(master.to(p.dtype).pin_memory(), non_blocking=True)

    def _fused(self, p: torch.Tensor) -> bool:
        # The fused kernel is what torch.optim.AdamW uses on the GPU here (see
        # get_megatron_optimizer); it takes fp32 tensors on the device only.
        all_fp32 = all(storage_dtype(d) == torch.float32 for d in self.dtypes.values())
        return p.is_cuda and p not in self.offloaded and all_fp32
