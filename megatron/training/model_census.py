"""Count a model's parameters by building it on the meta device (shapes only, no memory).

The model provider is the script's own, so the counts are exactly those of the model a run
trains: the embedding on the first pipeline stage, the output layer on the last (a second
copy of the embedding when tied and PP > 1, as in Megatron), experts sharded by EP.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, List, Tuple

import torch

from megatron.core.models.mamba.hybrid_stack import HybridStack
from megatron.core.process_groups import ProcessGroups, default_process_groups, set_default_process_groups
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.training.global_vars import get_args
from megatron.training.memory_estimate import ChunkShape, RankParams


def rank_params(chunks: List[torch.nn.Module]) -> RankParams:
    """This rank's parameters, split into routed-expert ones (``allreduce = False``) and the rest."""
    dense = expert = 0
    for chunk in chunks:
        for param in chunk.parameters():
            if getattr(param, "allreduce", True):
                dense += param.numel()
            else:
                expert += param.numel()
    return RankParams(dense=dense, expert=expert)


def chunk_shapes(chunks: List[torch.nn.Module]) -> List[ChunkShape]:
    """Layers and pre/post-processing of each chunk, read from the built modules."""
    shapes = []
    for chunk in chunks:
        core = chunk
        while hasattr(core, "module"):
            core = core.module
        # a hybrid stack names its layers by pattern symbol (Mamba, attention, MLP, MoE)
        pattern = "".join(getattr(m, "layer_pattern", "") for m in core.modules() if isinstance(m, HybridStack))
        layers = len(pattern) or sum(1 for m in core.modules() if isinstance(m, TransformerLayer))
        shapes.append(ChunkShape(layers, bool(getattr(core, "pre_process", True)),
                                 bool(getattr(core, "post_process", True)), hybrid_pattern=pattern))
    return shapes


@contextlib.contextmanager
def on_meta_device():
    """Build modules as shapes only: under the meta device, without weight initialization
    (which would draw from the RNG streams a live run relies on), prints swallowed."""
    args = get_args()
    saved = args.perform_initialization
    args.perform_initialization = False
    try:
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        args.perform_initialization = saved


def build_on_meta(model_provider: Callable, pre_process: bool, post_process: bool, **kwargs) -> torch.nn.Module:
    """``model_provider(...)`` built ``on_meta_device``."""
    with on_meta_device():
        return model_provider(pre_process=pre_process, post_process=post_process, **kwargs)


def count_full_model(model_provider: Callable) -> Tuple[int, int]:
    """(total parameters, of which embedding) of the whole model: one stage, no parallelism.

    The default process groups are swapped for single-process ones while it is built."""
    saved = default_process_groups()
    set_default_process_groups(ProcessGroups())
    try:
        model = build_on_meta(model_provider, True, True)
    finally:
        set_default_process_groups(saved)
    total = sum(p.numel() for p in model.parameters())
    embedding = getattr(model, "embedding", None)
    embedding_params = sum(p.numel() for p in embedding.parameters()) if embedding is not None else 0
    return total, embedding_params
