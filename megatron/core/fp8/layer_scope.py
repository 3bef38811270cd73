"""Which linears run in FP8: those of the transformer layers, less the first and last
``--num-layers-at-{start,end}-in-bf16`` layers under ``--first-last-layers-bf16``.

As in Megatron, FP8 applies to the GEMMs of the transformer layers only, the MoE
experts' included: the output layer (logits) and the embedding stay in the training
precision. The transformer block builds each layer inside
``fp8_layer_scope(config, layer_number)``; a column- or row-parallel linear built inside
a scope whose layer runs in FP8 gets an ``Fp8Scaling`` state (``new_linear_scaling``), one
built anywhere else gets None and runs exactly as without FP8. An expert's linears get
one each, like any other linear; the experts' forward (``moe/experts.py``) runs them
through ``fp8.linear`` (one expert at a time) or ``fp8.grouped_linear`` (all at once).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator, Optional

import torch

from megatron.core.fp8.gemm import select_backend
from megatron.core.fp8.recipe import Fp8Recipe
from megatron.core.fp8.scaling import Fp8Scaling

logger = logging.getLogger(__name__)
_building = threading.local()
_logged = set()


def layer_runs_in_fp8(config, layer_number: int) -> bool:
    """Whether transformer layer ``layer_number`` (1-based, global) runs its GEMMs in FP8."""
    if getattr(config, "fp8", None) is None:
        return False
    if config.first_last_layers_bf16:
        if layer_number <= config.num_layers_at_start_in_bf16:
            return False
        if layer_number > config.num_layers - config.num_layers_at_end_in_bf16:
            return False
    return True


@contextlib.contextmanager
def fp8_layer_scope(config, layer_number: int, amax_group=None) -> Iterator[None]:
    """Linears built inside run in FP8 when layer ``layer_number`` does. ``amax_group``: the
    group a tensor-parallel linear reduces its amaxes over, when not its tensor-parallel
    group (tensor x context parallel: the context-parallel ranks hold parts of one sequence,
    and one process would take the amax over all of it)."""
    previous = getattr(_building, "recipe", None), getattr(_building, "amax_group", None)
    _building.recipe = Fp8Recipe.from_config(config) if layer_runs_in_fp8(config, layer_number) else None
    _building.amax_group = amax_group
    try:
        yield
    finally:
        _building.recipe, _building.amax_group = previous


def amax_group_for(groups):
    """The ``amax_group`` of ``fp8_layer_scope`` for a model on ``groups``: tensor x context
    parallel under context parallelism, else None (the linear's tensor-parallel group)."""
    if groups.size("cp") == 1:
        return None
    if groups.tp_cp is not None:
        return groups.tp_cp
    if groups.size("tp") == 1:
        return groups.cp
    raise ValueError("FP8 linears under context parallelism reduce their amaxes over the tensor x context parallel "
                     "group: build the model with ProcessGroups that hold tp_cp")


def new_linear_scaling(device: torch.device) -> Optional[Fp8Scaling]:
    """The FP8 scaling state for a linear being built now, or None when it runs without FP8.

    Refuses (ValueError) a device without FP8 GEMMs here, at model construction, rather
    than at the first step. The device checked is the GPU when there is one, whatever
    ``device`` the weights start on (--use-cpu-initialization builds them on CPU first).
    """
    recipe = getattr(_building, "recipe", None)
    if recipe is None:
        return None
    run_on = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    backend = select_backend(run_on, recipe.emulation)
    if (recipe, backend) not in _logged:
        _logged.add((recipe, backend))
        how = ("torch._scaled_mm (MoE experts with --moe-grouped-gemm: torch._scaled_grouped_mm on Hopper)"
               if backend == "scaled_mm" else "an fp32 emulation (slow)")
        logger.info("FP8 backend: transformer-layer GEMMs, MoE experts included, in FP8 (format %s, recipe %s) "
                    "through %s", recipe.fmt, recipe.recipe, how)
    scaling = Fp8Scaling(recipe, device=device)
    scaling.amax_group = getattr(_building, "amax_group", None)
    return scaling
