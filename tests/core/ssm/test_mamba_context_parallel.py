"""The Mamba-2 mixer under context parallelism equals one process.

Each rank builds the same mixer twice (the same CPU-drawn weights): one without a CP
group, run on the whole sequence, and one over the CP group, run on the rank's
load-balanced share (chunks i and 2CP-1-i). The CP output and input gradient of this
rank's tokens must equal the reference rows, and the CP mixer's parameter gradients,
summed over the ranks (what the data x context parallel reduction does), must equal the
reference gradients.

Tolerance, relative to each reference tensor's largest entry: fp32 throughout; the CP
path runs the same conv and scan on a block of the heads, so only the order of float32
sums differs (the weight gradients add the tokens' terms in another order: ~1e-7). 1e-5
is far below a real error: scanning the chunks in rank order instead of position order
(``test_chunks_in_rank_order_are_caught``) moves the output by > 10%.
"""

import pytest
import torch

from tests.multirank import run_on_ranks

RTOL = 1e-5
S, B, HIDDEN, HEADS, HEAD_DIM, STATE = 16, 2, 32, 8, 8, 8


def _mixer(groups: int, pg_collection):
    from megatron.core.ssm.mamba_config import MambaConfig
    from megatron.core.ssm.mamba_mixer import MambaMixer
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True)
    mamba = MambaConfig(mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=groups,
                        mamba_num_heads=HEADS, chunk_size=4)
    torch.manual_seed(7)
    return MambaMixer(config, mamba, pg_collection=pg_collection)


def _case(rank, world, groups, rank_order):
    import torch.distributed as dist

    from megatron.core.process_groups import ProcessGroups
    from megatron.core.transformer.context_parallel.layout import slice_for_cp_rank

    seq = S * world // 2
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(seq, B, HIDDEN, generator=gen)
    dout = torch.randn(seq, B, HIDDEN, generator=gen)

    # one-rank tensor-parallel groups (every rank calls new_group for each)
    tp = [dist.new_group([r]) for r in range(world)][rank]
    ref = _mixer(groups, ProcessGroups(tp=tp))
    with torch.no_grad():
        # larger dt and D than the initial ones, so a misplaced token or head shows
        ref.dt_bias.add_(1.0)
        ref.D.uniform_(0.5, 1.5, generator=gen)
    cp = _mixer(groups, ProcessGroups(tp=tp, cp=dist.group.WORLD))
    cp.load_state_dict(ref.state_dict())
    if rank_order:
        # planted bug: the gathered chunks are scanned in rank order, not position order
        cp.context_parallel.natural = list(range(2 * world))

    hr = hidden.clone().requires_grad_()
    out_ref, _ = ref(hr)
    out_ref.backward(dout)

    hl = slice_for_cp_rank(hidden, 0, rank, world).clone().requires_grad_()
    out, _ = cp(hl)
    out.backward(slice_for_cp_rank(dout, 0, rank, world))

    def rows(t):
        return slice_for_cp_rank(t, 0, rank, world)

    def relative(a, reference):
        return ((a - reference).abs().max() / reference.abs().max()).item()

    errors = {"out": relative(out, rows(out_ref)), "dhidden": relative(hl.grad, rows(hr.grad))}
    reference_grads = dict(ref.named_parameters())
    for name, param in cp.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        errors["d" + name] = relative(grad, reference_grads[name].grad)
    errors["scale"] = out_ref.abs().max().item()
    return errors


@pytest.mark.parametrize("world, groups", [(2, 2), (2, 4), (2, 1), (4, 2), (4, 1)],
                         ids=["cp2-g2-split", "cp2-g4-split", "cp2-g1-shared", "cp4-g2-shared", "cp4-g1-shared"])
def test_context_parallel_mixer_matches_one_process(world, groups):
    for rank, errors in enumerate(run_on_ranks(_case, world, args=(groups, False))):
        scale = errors.pop("scale")
        assert scale > 0.1, scale
        bad = {k: v for k, v in errors.items() if not v < RTOL}
        assert not bad, f"rank {rank}: {bad}"
    # every parameter was compared: in_proj, conv1d weight and bias, dt_bias, A_log, D, norm, out_proj
    assert len(errors) == 2 + 8


def test_chunks_in_rank_order_are_caught():
    errors = run_on_ranks(_case, 2, args=(2, True))
    assert max(e["out"] for e in errors) > 0.1, errors


def test_position_order_of_the_gathered_chunks():
    from megatron.core.ssm.mamba_context_parallel import _position_order

    # CP 2: ranks hold chunks (0, 3) and (1, 2); gathered in rank order 0 3 1 2
    assert _position_order(2) == ([0, 2, 3, 1], [0, 3, 1, 2])
    natural, ranked = _position_order(4)
    assert ranked == [0, 7, 1, 6, 2, 5, 3, 4]
    assert [ranked[p] for p in natural] == list(range(8))


@pytest.mark.parametrize("heads, groups, cp, flag", [
    (6, 2, 4, "--context-parallel-size 4"),
    (8, 6, 4, "--mamba-num-groups"),
])
def test_splits_that_do_not_divide_are_refused_by_name(heads, groups, cp, flag):
    from megatron.core.ssm.mamba_context_parallel import check_context_parallel_split

    with pytest.raises(ValueError, match=flag):
        check_context_parallel_split(heads, groups, cp)
    check_context_parallel_split(heads, groups, 1)
