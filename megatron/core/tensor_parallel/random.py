"""Named random streams for tensor parallelism, and activation recompute that replays them.

Dropout inside a tensor-parallel region (on sharded activations) must differ between
tensor-parallel ranks, while dropout on replicated activations must be identical. The
tracker keeps named generator states; ``fork(name)`` swaps one in for the duration of a
block and swaps the default back afterwards. It tracks the CUDA generator when CUDA is
available and the CPU generator otherwise, so the same code runs on both.

On CUDA each stream is a generator of its own, swapped in by reference
(``graphsafe_set_state``) rather than by copying state: that is allowed while a CUDA graph
is being captured, and a graph that registers the generators (``graph_generators``) draws
fresh numbers at each replay, the same ones eager steps would draw.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, List, Optional

import torch

from megatron.core import process_groups
from megatron.core.fp8 import recompute_replay
from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.collectives import all_gather_first_dim

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_EXPERT_PARALLEL_RNG_TRACKER_NAME = "expert-parallel-rng"
_DATA_PARALLEL_RNG_TRACKER_NAME = "data-parallel-rng"

# Megatron's seed offsets: distinct, fixed, so checkpoints of RNG state stay comparable.
_TP_SEED_OFFSET = 2718
_EP_SEED_OFFSET = 1024
_EP_RANK_SEED_STRIDE = 100


def get_model_parallel_rng_tracker_name() -> str:
    return _MODEL_PARALLEL_RNG_TRACKER_NAME


def get_expert_parallel_rng_tracker_name() -> str:
    return _EXPERT_PARALLEL_RNG_TRACKER_NAME


def get_data_parallel_rng_tracker_name() -> str:
    return _DATA_PARALLEL_RNG_TRACKER_NAME


def _rng_device() -> str:
    """The device whose default generator dropout draws from: cuda when present, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _get_rng_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def _seeded_state(seed: int, device: str) -> torch.Tensor:
    """Generator state right after seeding with ``seed``, without touching the default."""
    return torch.Generator(device=device).manual_seed(seed).get_state()


class CudaRNGStatesTracker:
    """Named generator states (Megatron's name; tracks the CPU generator without CUDA).

    ``add(name, seed)`` creates a stream; ``with fork(name):`` makes it the default
    generator of the tracked device inside the block, saves where it got to, and restores
    the previous default state on exit.
    """

    def __init__(self, device: Optional[str] = None) -> None:
        self._fixed_device = device
        self.reset()

    @property
    def device(self) -> str:
        return self._fixed_device or self._device

    def reset(self) -> None:
        """Forget every stream (and re-detect the device)."""
        self._device = _rng_device()
        self.states_: Dict[str, torch.Tensor] = {}  # streams kept as states (CPU)
        self.generators_: Dict[str, torch.Generator] = {}  # streams kept as generators (CUDA)
        self.seeds_ = set()

    def _by_reference(self) -> bool:
        return self.device == "cuda" and hasattr(torch.Generator, "graphsafe_set_state")

    def is_initialized(self) -> bool:
        return bool(self.states_ or self.generators_)

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of the named states (for checkpoints and recompute)."""
        states = {name: state.clone() for name, state in self.states_.items()}
        states.update({name: generator.get_state() for name, generator in self.generators_.items()})
        return states

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        """Replace the named states (the inverse of ``get_states``)."""
        if not self._by_reference():
            self.states_ = {name: state.clone() for name, state in states.items()}
            return
        generators = {}
        for name, state in states.items():
            generator = self.generators_.get(name) or torch.Generator(device="cuda")
            generator.set_state(state)
            generators[name] = generator
        self.generators_ = generators

    def graph_generators(self) -> List[torch.Generator]:
        """The streams' generators, for ``CUDAGraph.register_generator_state`` (CUDA only)."""
        return list(self.generators_.values())

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed``; names and seeds must be new."""
        if name in self.states_ or name in self.generators_:
            raise RuntimeError(f"RNG stream {name!r} already exists; call reset() first")
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} is already used by another RNG stream; streams need distinct seeds")
        self.seeds_.add(seed)
        if self._by_reference():
            self.generators_[name] = torch.Generator(device="cuda").manual_seed(seed)
        else:
            self.states_[name] = _seeded_state(seed, self.device)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Draw from stream ``name`` inside the block; the default stream resumes after it."""
        if name not in self.states_ and name not in self.generators_:
            raise RuntimeError(
                f"RNG stream {name!r} does not exist: call "
                "megatron.core.tensor_parallel.model_parallel_cuda_manual_seed(seed) first "
                "(megatron.training's initialization does this from --seed)"
            )
        if name in self.generators_:
            default = torch.cuda.default_generators[torch.cuda.current_device()]
            original = default.graphsafe_get_state()
            default.graphsafe_set_state(self.generators_[name])
            try:
                yield
            finally:
                default.graphsafe_set_state(original)
            return
        device = self.device
        original = _get_rng_state(device)
        _set_rng_state(self.states_[name], device)
        try:
            yield
        finally:
            self.states_[name] = _get_rng_state(device)
            _set_rng_state(original, device)


_RNG_STATE_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    """The process-wide tracker (Megatron's name; CPU generator when there is no CUDA)."""
    return _RNG_STATE_TRACKER


def model_parallel_cuda_manual_seed(
    seed: int, tp_rank: Optional[int] = None, ep_rank: Optional[int] = None, etp_rank: Optional[int] = None
) -> None:
    """Seed the default generator and the tracker's streams as Megatron does.

    default generator of the tracked device and 'data-parallel-rng': ``seed``;
    'model-parallel-rng': ``seed + 2718 + tp_rank`` (differs across tensor-parallel ranks);
    'expert-parallel-rng': ``seed + 1024 + 100 * ep_rank + etp_rank``.
    A rank left as None is this process's rank in the default ProcessGroups (tp, ep,
    expt_tp), as Megatron looks it up; 0 when no groups are set up.
    """
    if None in (tp_rank, ep_rank, etp_rank):
        groups = process_groups.default_process_groups()
        tp_rank = groups.rank("tp") if tp_rank is None else tp_rank
        ep_rank = groups.rank("ep") if ep_rank is None else ep_rank
        etp_rank = groups.rank("expt_tp") if etp_rank is None else etp_rank
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    if tracker.device == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    tracker.add(_DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _TP_SEED_OFFSET + tp_rank)
    tracker.add(
        _EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + _EP_SEED_OFFSET + _EP_RANK_SEED_STRIDE * ep_rank + etp_rank
    )


def _capture_rng() -> Dict[str, Any]:
    """CPU, CUDA (when present) and tracker states, to replay a forward exactly."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _restore_rng(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])


class CheckpointFunction(torch.autograd.Function):
    """Run ``function`` without keeping its activations; rerun it in backward.

    Forward saves only the inputs and the RNG states; backward restores those states,
    reruns ``function`` with grad enabled (so dropout draws the same masks), backpropagates
    through it and restores the RNG states it found. FP8 linears under ``delayed`` scaling
    quantize the rerun with the scales the forward used (``fp8.recompute_replay``).
    Parameters used inside get their gradients during that inner backward. The rerun also
    sees the forward's context variables (such as the schedule's auxiliary-loss scale),
    since the backward runs outside the block that set them.
    """

    @staticmethod
    def forward(ctx, run_function, tp_group, *args):
        """``tp_group`` not None: keep only this rank's 1/tp slice of the first tensor argument
        (the hidden states, identical on every tensor-parallel rank) and all-gather it back
        in backward (--distribute-saved-activations)."""
        ctx.run_function = run_function
        ctx.rng_states = _capture_rng()
        ctx.context = contextvars.copy_context()
        with torch.no_grad(), recompute_replay.recording() as fp8_scales:
            outputs = run_function(*args)
        ctx.fp8_scales = fp8_scales if fp8_scales.entries else None
        tensor_slots = [i for i, arg in enumerate(args) if torch.is_tensor(arg)]
        ctx.tensor_slots = tensor_slots
        ctx.other_args = [None if torch.is_tensor(arg) else arg for arg in args]
        saved = [args[i] for i in tensor_slots]
        ctx.tp_group = tp_group
        if tp_group is not None and saved:
            ctx.first_shape, ctx.first_requires_grad = saved[0].shape, saved[0].requires_grad
            saved[0] = _my_flat_slice(saved[0].detach(), tp_group)
        ctx.save_for_backward(*saved)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "checkpoint() is incompatible with torch.autograd.grad(); use .backward() instead"
            )
        args = list(ctx.other_args)
        saved_tensors = list(ctx.saved_tensors)
        requires_grad = [t.requires_grad for t in saved_tensors]
        if ctx.tp_group is not None and saved_tensors:
            saved_tensors[0] = _gather_flat_slices(saved_tensors[0], ctx.tp_group, ctx.first_shape)
            requires_grad[0] = ctx.first_requires_grad
        for slot, saved, needs_grad in zip(ctx.tensor_slots, saved_tensors, requires_grad):
            detached = saved.detach()
            detached.requires_grad_(needs_grad)
            args[slot] = detached
        found = _capture_rng()
        _restore_rng(ctx.rng_states)
        try:
            with torch.enable_grad(), recompute_replay.replaying(ctx.fp8_scales):
                outputs = ctx.context.run(ctx.run_function, *args)
        finally:
            _restore_rng(found)
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grad_outputs)
            if torch.is_tensor(out) and out.requires_grad and grad is not None
        ]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        grads = tuple(arg.grad if torch.is_tensor(arg) else None for arg in args)
        return (None, None) + grads


def _my_flat_slice(tensor: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous 1/world part of ``tensor`` flattened (zero-padded to divide)."""
    world, rank = group_size(group), group_rank(group)
    flat = tensor.reshape(-1)
    per_rank = -(-flat.numel() // world)
    padded = torch.nn.functional.pad(flat, (0, per_rank * world - flat.numel()))
    return padded[rank * per_rank : (rank + 1) * per_rank].clone()


def _gather_flat_slices(part: torch.Tensor, group, shape) -> torch.Tensor:
    """Inverse of ``_my_flat_slice`` over the group: the whole tensor of ``shape``."""
    numel = 1
    for dim in shape:
        numel *= dim
    return all_gather_first_dim(part, group)[:numel].view(shape)


def checkpoint(function, distribute_saved_activations: bool, *args, tp_group=None):
    """``function(*args)`` with activation recompute (Megatron's ``tensor_parallel.checkpoint``).

    Only the tensors in ``args`` are kept for backward; RNG states (CPU, CUDA, tracker) are
    replayed so dropout masks in the recompute equal the forward's. At least one tensor in
    ``args`` must require grad for the backward to run (as with reentrant checkpointing).
    With ``distribute_saved_activations`` the first tensor argument, which must be the same
    on every rank of ``tp_group`` (the default tensor-parallel group when None), is stored
    as one 1/tp slice per rank and all-gathered when the backward recomputes.
    """
    group = None
    if distribute_saved_activations:
        group = tp_group if tp_group is not None else process_groups.default_process_groups().tp
        if group_size(group) == 1:
            group = None
    return CheckpointFunction.apply(function, group, *args)
