"""Layer patterns: parsing, pipeline cuts, and the older ratio flags' allocation."""

import pytest

from megatron.core.models.mamba.layer_pattern import (
    allocate_layers,
    parse_pattern,
    resolve_layer_pattern,
    stage_segment,
)


def test_stage_cuts_give_each_stage_its_segment_and_offset():
    assert stage_segment("M-M*|-MM*", 2, 0) == ("M-M*", 0)
    assert stage_segment("M-M*|-MM*", 2, 1) == ("-MM*", 4)
    # No cut: an even split.
    assert stage_segment("MM*-", 2, 1) == ("*-", 2)
    assert stage_segment("MM*-", 1, 0) == ("MM*-", 0)
    # one stage runs a pipelined pattern whole (a PP run's flags on one process)
    assert stage_segment("M-M*|-MM*", 1, 0) == ("M-M*-MM*", 0)


def test_virtual_stages_go_round_the_pipeline_ranks():
    """pp x vp stages; stage i is chunk i // pp of rank i % pp (Megatron's layout rule)."""
    pattern = "M-|*M|M*|-M"
    assert stage_segment(pattern, 2, 0, 2, 0) == ("M-", 0)
    assert stage_segment(pattern, 2, 1, 2, 0) == ("*M", 2)
    assert stage_segment(pattern, 2, 0, 2, 1) == ("M*", 4)
    assert stage_segment(pattern, 2, 1, 2, 1) == ("-M", 6)
    assert stage_segment("MM*-MM*-", 2, 1, 2, 1) == ("*-", 6)  # no cut: an even split into 4
    with pytest.raises(ValueError, match="2 pipeline segments but the pipeline has 4 stages"):
        stage_segment("MM|MM", 2, 0, 2, 0)
    with pytest.raises(ValueError, match="not divisible by 4 stages"):
        stage_segment("MM*-MM", 2, 0, 2, 0)


@pytest.mark.parametrize("pattern,pp,match", [
    ("MM|MM", 3, "2 pipeline segments"), ("MM*", 2, "not divisible"), ("MM||M", 3, "empty pipeline segment"),
    ("MM||M", 1, "empty pipeline segment"),
])
def test_bad_cuts_are_refused(pattern, pp, match):
    with pytest.raises(ValueError, match=match):
        stage_segment(pattern, pp, 0)


@pytest.mark.parametrize("pattern,match", [("MGM", "Gated DeltaNet"), ("MM/", "multi-token"), ("MxM", "unknown symbol"),
                                           ("|", "no layers")])
def test_unsupported_symbols_are_refused(pattern, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(pattern)


def test_ratio_allocation_spreads_layers_evenly():
    assert allocate_layers(4, 0.0, 0.0) == "MMMM"
    assert allocate_layers(8, 0.25, 0.0) == "MM*MM*MM"
    pattern = allocate_layers(12, 0.25, 0.25)
    assert (pattern.count("*"), pattern.count("-"), pattern.count("M")) == (3, 3, 6)
    assert "**" not in pattern and "--" not in pattern
    assert allocate_layers(4, 0.5, 0.0, override_pattern="M*-M") == "M*-M"


def test_resolve_checks_the_layer_count_and_refuses_mixed_flags():
    assert resolve_layer_pattern(4, "M*|-M") == "M*|-M"
    with pytest.raises(ValueError, match="--num-layers is 5"):
        resolve_layer_pattern(5, "M*|-M")
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_layer_pattern(4, "M*-M", attention_ratio=0.25)
    with pytest.raises(ValueError, match="has 3 layers but --num-layers is 4"):
        resolve_layer_pattern(4, None, override_pattern="M*M")
