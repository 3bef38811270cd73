"""The hybrid layer pattern: which kind of layer each position of the stack is.

One character per layer (Megatron's symbols): ``M`` Mamba-2, ``*`` self-attention,
``-`` MLP, ``E`` MoE MLP. ``|`` cuts the pattern into pipeline stages (one segment per
stage) and is not a layer. Megatron's other symbols (``G`` Gated DeltaNet, ``D`` DSA
attention, ``/`` multi-token prediction) are refused with a clear error.

The older flags (--hybrid-attention-ratio, --hybrid-mlp-ratio, --hybrid-override-pattern)
are turned into a pattern by ``allocate_layers``, spreading attention and then MLP layers
evenly through the Mamba layers as Megatron's allocator does.
"""

from __future__ import annotations

from typing import List, Optional

MAMBA, ATTENTION, MLP, MOE, STAGE_CUT = "M", "*", "-", "E", "|"
LAYER_SYMBOLS = (MAMBA, ATTENTION, MLP, MOE)
_UNSUPPORTED = {"G": "Gated DeltaNet layers", "D": "DSA attention layers", "/": "multi-token prediction"}


def parse_pattern(pattern: str, flag: str = "--hybrid-layer-pattern") -> List[str]:
    """The pattern's pipeline segments (one string of layer symbols per stage)."""
    for ch in pattern:
        if ch in _UNSUPPORTED:
            raise ValueError(f"{flag} {pattern!r}: symbol {ch!r} ({_UNSUPPORTED[ch]}) is not supported here; "
                             f"use only {' '.join(LAYER_SYMBOLS)} and {STAGE_CUT}")
        if ch not in LAYER_SYMBOLS and ch != STAGE_CUT:
            raise ValueError(f"{flag} {pattern!r}: unknown symbol {ch!r}; use {' '.join(LAYER_SYMBOLS)} "
                             f"(Mamba, attention, MLP, MoE) and {STAGE_CUT} (pipeline-stage cut)")
    segments = pattern.split(STAGE_CUT)
    if not "".join(segments):
        raise ValueError(f"{flag} {pattern!r} has no layers")
    return segments


def allocate_layers(num_layers: int, attention_ratio: float, mlp_ratio: float,
                    override_pattern: Optional[str] = None) -> str:
    """The pattern of the older flags: ``override_pattern`` as given, else attention layers
    spread evenly among Mamba layers (round(L * attention_ratio) of them), then MLP layers
    spread evenly among the remaining Mamba layers (round(L * mlp_ratio))."""
    for flag, value in (("--hybrid-attention-ratio", attention_ratio), ("--hybrid-mlp-ratio", mlp_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1], got {value}")
    if attention_ratio + mlp_ratio > 1.0:
        raise ValueError(f"--hybrid-attention-ratio {attention_ratio} + --hybrid-mlp-ratio {mlp_ratio} exceeds 1")
    if override_pattern is not None:
        if STAGE_CUT in override_pattern:
            raise ValueError("--hybrid-override-pattern takes no '|'; use --hybrid-layer-pattern for stage cuts")
        parse_pattern(override_pattern, "--hybrid-override-pattern")
        if len(override_pattern) != num_layers:
            raise ValueError(f"--hybrid-override-pattern {override_pattern!r} has {len(override_pattern)} layers but "
                             f"--num-layers is {num_layers}: make them agree")
        return override_pattern
    layers = [MAMBA] * num_layers
    n_attention = round(num_layers * attention_ratio)
    n_mamba = num_layers - n_attention
    # Place each attention layer in the middle of an equal run of Mamba layers.
    section = n_mamba / (n_attention + 1)
    x = section
    for i in range(num_layers):
        if x < 0.5:
            layers[i] = ATTENTION
            x += section
        else:
            x -= 1
    n_mlp = round(num_layers * mlp_ratio)
    if n_mlp > 0:
        n_mamba -= n_mlp
        ratio = n_mamba / n_mlp  # Mamba layers per MLP layer
        x = ratio
        for i in range(num_layers):
            if layers[i] == MAMBA:
                if x < 0.5:
                    layers[i] = MLP
                    x += ratio
                else:
                    x -= 1
    return "".join(layers)


def stage_segment(pattern: str, pp_size: int, pp_rank: int, vp_size: Optional[int] = None,
                  vp_stage: Optional[int] = None) -> tuple:
    """(this stage's layer symbols, global offset of its first layer) for ``pp_rank`` and,
    with the interleaved schedule, its model chunk ``vp_stage`` of ``vp_size``.

    The model has pp_size x vp_size stages (vp_size 1 without interleaving); stage i runs on
    pipeline rank i % pp_size as its chunk i // pp_size, the rule of Megatron's
    --pipeline-model-parallel-layout. With ``|`` cuts there must be one segment per stage;
    without, the layers are split evenly (the count must divide). A single stage (no
    pipeline parallelism) runs the whole pattern whatever its cuts, so a pipelined run's
    pattern also runs on one process."""
    chunks = vp_size or 1
    stages = pp_size * chunks
    segments = parse_pattern(pattern)
    if any(not seg for seg in segments):
        raise ValueError(f"--hybrid-layer-pattern {pattern!r} has an empty pipeline segment")
    if stages == 1:
        return "".join(segments), 0
    if len(segments) == 1:
        layers = segments[0]
        if len(layers) % stages:
            raise ValueError(f"--hybrid-layer-pattern {pattern!r} has {len(layers)} layers, not divisible by "
                             f"{_stages_named(pp_size, chunks)}: cut the stages with '|'")
        per = len(layers) // stages
        segments = [layers[i * per:(i + 1) * per] for i in range(stages)]
    if len(segments) != stages:
        raise ValueError(f"--hybrid-layer-pattern {pattern!r} has {len(segments)} pipeline segments but the "
                         f"pipeline has {_stages_named(pp_size, chunks)}: use {stages - 1} '|' cuts")
    stage = (vp_stage or 0) * pp_size + pp_rank
    offset = sum(len(seg) for seg in segments[:stage])
    return segments[stage], offset


def _stages_named(pp_size: int, chunks: int) -> str:
    if chunks == 1:
        return f"--pipeline-model-parallel-size {pp_size} stages"
    return (f"{pp_size * chunks} stages (--pipeline-model-parallel-size {pp_size} x {chunks} virtual stages per "
            "pipeline rank)")


def resolve_layer_pattern(num_layers: int, hybrid_layer_pattern: Optional[str], attention_ratio: float = 0.0,
                          mlp_ratio: float = 0.0, override_pattern: Optional[str] = None) -> str:
    """The pattern the flags describe: --hybrid-layer-pattern when given (its layer count
    must equal --num-layers), else the older flags' allocation."""
    if hybrid_layer_pattern is None:
        return allocate_layers(num_layers, attention_ratio, mlp_ratio, override_pattern)
    if override_pattern is not None or attention_ratio or mlp_ratio:
        raise ValueError("--hybrid-layer-pattern cannot be combined with --hybrid-override-pattern, "
                         "--hybrid-attention-ratio or --hybrid-mlp-ratio: give only the pattern")
    layers = len("".join(parse_pattern(hybrid_layer_pattern)))
    if layers != num_layers:
        raise ValueError(f"--hybrid-layer-pattern {hybrid_layer_pattern!r} has {layers} layers but --num-layers is "
                         f"{num_layers}: make them agree")
    return hybrid_layer_pattern


def count_layers(pattern: str) -> dict:
    """{symbol: how many layers of that kind} over the whole pattern."""
    layers = "".join(parse_pattern(pattern))
    return {symbol: layers.count(symbol) for symbol in LAYER_SYMBOLS}
