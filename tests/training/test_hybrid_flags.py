"""pretrain_hybrid.py refuses, by name, the GPT flags a hybrid stack would otherwise ignore
(its shape comes from the layer pattern) and context-parallel sizes its mixers cannot split."""

import pytest

from tests.training.mamba_runs import hybrid_argv


def _args(**changes):
    from megatron.training.arguments import parse_args

    args = parse_args(None, args=hybrid_argv([]))
    args.virtual_pipeline_model_parallel_size = None  # derived at start-up
    for name, value in changes.items():
        setattr(args, name, value)
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(mtp_num_layers=1), "--mtp-num-layers 1 is not supported for hybrid models: multi-token prediction"),
    (dict(multi_latent_attention=True), "--multi-latent-attention is not supported for hybrid models"),
    (dict(moe_layer_freq=2), "--moe-layer-freq 2 is not supported for hybrid models: MoE layers sit where"),
    (dict(decoder_first_pipeline_num_layers=1), "--decoder-first-pipeline-num-layers 1 .* '\\|' cuts"),
    (dict(decoder_last_pipeline_num_layers=1), "--decoder-last-pipeline-num-layers 1 .* '\\|' cuts"),
    (dict(num_experts=4), "--num-experts 4 is given but the hybrid layer pattern 'M-\\*M' has no MoE layer"),
    (dict(context_parallel_size=3), "SSM heads of a tensor-parallel rank \\(8:.*--context-parallel-size 3"),
    (dict(context_parallel_size=4), None),  # 8 heads, 2 groups: two CP ranks share each group
    (dict(context_parallel_size=4, mamba_num_heads=24, mamba_num_groups=6),
     "--mamba-num-groups / --tensor-model-parallel-size = 6 groups per tensor-parallel rank and "
     "--context-parallel-size 4 must divide one another"),
])
def test_hybrid_flags_are_checked_by_name(changes, message):
    import pretrain_hybrid

    args = _args(**changes)
    if message is None:
        assert pretrain_hybrid.check_hybrid_layout(args) == "M-*M"
        return
    with pytest.raises(ValueError, match=message):
        pretrain_hybrid.check_hybrid_layout(args)


def test_the_tiny_hybrid_passes():
    import pretrain_hybrid

    assert pretrain_hybrid.check_hybrid_layout(_args()) == "M-*M"
