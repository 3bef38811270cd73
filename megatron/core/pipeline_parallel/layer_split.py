"""Which transformer layers each pipeline stage (and each virtual chunk) holds.

Virtual stage ``v = chunk * PP + pp_rank`` holds a contiguous run of layers, and virtual
stages follow each other in order, as Megatron assigns them. With 8 layers, PP=2, VPP=2:

    rank 0: chunk 0 = layers 1-2, chunk 1 = layers 5-6
    rank 1: chunk 0 = layers 3-4, chunk 1 = layers 7-8

Uneven stages (``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``)
give the first / last pipeline rank that many layers in total, split evenly over its
chunks; the other ranks share the rest evenly. ``--account-for-embedding-in-pipeline-split``
(``--account-for-loss-in-pipeline-split``) counts the embedding (loss) as one layer of the
first (last) virtual stage, which therefore builds one transformer layer fewer.
"""

from __future__ import annotations

from typing import List, Optional, Tuple


def _layers_per_rank(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> List[int]:
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}: "
                "change one, or give --decoder-first/last-pipeline-num-layers"
            )
        return [num_layers // pp] * pp
    if pp < 2:
        raise ValueError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    middle_ranks = pp - int(first is not None) - int(last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_ranks == 0 and middle_layers) or (middle_ranks and middle_layers % middle_ranks):
        raise ValueError(
            f"--decoder-first-pipeline-num-layers {first} / --decoder-last-pipeline-num-layers {last}: "
            f"the other {middle_layers} of --num-layers {num_layers} do not split evenly over the "
            f"{middle_ranks} remaining stage(s); change the first/last stage layer counts"
        )
    per_middle = middle_layers // middle_ranks if middle_ranks else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def virtual_stage_layer_counts(
    num_layers: int,
    pp: int,
    vpp: Optional[int] = None,
    first: Optional[int] = None,
    last: Optional[int] = None,
    account_for_embedding: bool = False,
    account_for_loss: bool = False,
) -> List[int]:
    """Transformer layers built by each virtual stage, indexed ``chunk * pp + rank``.

    The counts sum to ``num_layers``. Raises ValueError (naming the flag) when the
    layers cannot be split as asked.
    """
    vpp = vpp or 1
    total = num_layers + int(account_for_embedding) + int(account_for_loss)
    per_rank = _layers_per_rank(total, pp, first, last)
    counts = [0] * (pp * vpp)
    for rank, n in enumerate(per_rank):
        if n % vpp:
            raise ValueError(
                f"pipeline rank {rank} holds {n} layers, which do not split over {vpp} virtual stages "
                "(--num-virtual-stages-per-pipeline-rank): choose layer counts divisible by it"
            )
        for chunk in range(vpp):
            counts[chunk * pp + rank] = n // vpp
    if account_for_embedding:
        counts[0] -= 1
    if account_for_loss:
        counts[-1] -= 1
    if min(counts) < 0:
        raise ValueError(
            "--account-for-embedding/loss-in-pipeline-split left a virtual stage with fewer than "
            "zero layers: give the first/last stage more layers"
        )
    return counts


def stage_layers(
    num_layers: int,
    pp: int,
    pp_rank: int,
    vp_stage: Optional[int] = None,
    vpp: Optional[int] = None,
    first: Optional[int] = None,
    last: Optional[int] = None,
    account_for_embedding: bool = False,
    account_for_loss: bool = False,
) -> Tuple[int, int]:
    """``(number of layers, offset)`` of chunk ``vp_stage`` (0 without VPP) on ``pp_rank``.

    The chunk builds global layers ``offset + 1 .. offset + number`` (1-based).
    """
    counts = virtual_stage_layer_counts(num_layers, pp, vpp, first, last, account_for_embedding, account_for_loss)
    index = (vp_stage or 0) * pp + pp_rank
    if not 0 <= pp_rank < pp or index >= len(counts):
        raise ValueError(f"no virtual stage for pipeline rank {pp_rank}, chunk {vp_stage} with PP={pp}, VPP={vpp}")
    return counts[index], sum(counts[:index])


def stage_layers_from_config(config, pp: int, pp_rank: int, vp_stage: Optional[int] = None) -> Tuple[int, int]:
    """``stage_layers`` with the split read from a ``TransformerConfig``."""
    return stage_layers(
        config.num_layers,
        pp,
        pp_rank,
        vp_stage,
        getattr(config, "virtual_pipeline_model_parallel_size", None) if pp > 1 else None,
        getattr(config, "num_layers_in_first_pipeline_stage", None),
        getattr(config, "num_layers_in_last_pipeline_stage", None),
        getattr(config, "account_for_embedding_in_pipeline_split", False),
        getattr(config, "account_for_loss_in_pipeline_split", False),
    )
