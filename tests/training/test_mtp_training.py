"""pretrain_gpt.py with --mtp-num-layers: the iteration line reports ``mtp_1 loss``, the
MTP parameters train and are checkpointed, and a resumed run continues bit-exactly."""

from __future__ import annotations

import re

import pytest

from tests.training.checkpointing.ckpt_runs import run_ckpt

MTP = ["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.5", "--position-embedding-type", "rope",
       "--save-interval", "2"]
MTP_LOSS = re.compile(r"mtp_1 loss: ([0-9.Ee+-]+) \|")
TOTAL, SAVED_AT = 4, 2


def test_mtp_logs_trains_and_resumes_bit_exactly(tmp_path):
    root = str(tmp_path)
    full = run_ckpt(1, MTP + ["--save", root], TOTAL, snapshots=("load", TOTAL))
    mtp_losses = MTP_LOSS.findall(full.log)
    assert len(mtp_losses) == TOTAL, full.log[-2000:]
    assert all(0 < float(x) < 20 for x in mtp_losses)
    start, end = full.snapshots["load"], full.snapshots[TOTAL]
    assert "mtp.layers.0.eh_proj.weight" in start and "mtp.layers.0.transformer_layer.mlp.linear_fc1.weight" in start
    assert not (start["mtp.layers.0.eh_proj.weight"] == end["mtp.layers.0.eh_proj.weight"]).all()

    resumed = run_ckpt(1, MTP + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    assert resumed.losses == {it: h for it, h in full.losses.items() if it > SAVED_AT}
    assert MTP_LOSS.findall(resumed.log) == mtp_losses[SAVED_AT:]


def test_mtp_refuses_learned_absolute_positions():
    with pytest.raises(Exception, match="rope or none"):
        run_ckpt(1, ["--mtp-num-layers", "1"], 1)


def test_mtp_flops_add_a_layer_the_projection_and_a_logit_head_per_depth():
    from types import SimpleNamespace

    from megatron.training.flops import num_floating_point_operations

    base = dict(seq_length=2048, hidden_size=1024, padded_vocab_size=50304, ffn_hidden_size=4096,
                num_attention_heads=16, num_query_groups=16, kv_channels=64, group_query_attention=False, swiglu=False)
    s, h, V = 2048, 1024, 50304
    plain_25 = num_floating_point_operations(SimpleNamespace(num_layers=25, **base), 1)
    with_mtp = num_floating_point_operations(SimpleNamespace(num_layers=24, mtp_num_layers=1, **base), 1)
    assert with_mtp == plain_25 + s * (6 * (3 * h + 2 * h * h) + 6 * h * V)


def test_mtp_flops_follow_the_last_layers_moe_width():
    from types import SimpleNamespace

    from megatron.training.flops import num_floating_point_operations

    base = dict(seq_length=1024, hidden_size=512, padded_vocab_size=32000, ffn_hidden_size=2048,
                num_attention_heads=8, num_query_groups=8, kv_channels=64, group_query_attention=False, swiglu=False,
                num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256, moe_shared_expert_intermediate_size=None)
    s, h, V = 1024, 512, 32000
    extra = s * (6 * (3 * h + 2 * h * h) + 6 * h * V)
    plain = num_floating_point_operations(SimpleNamespace(num_layers=3, moe_layer_freq=[0, 1, 1], **base), 1)
    mtp = num_floating_point_operations(SimpleNamespace(num_layers=2, moe_layer_freq=[0, 1], mtp_num_layers=1, **base), 1)
    assert mtp == plain + extra
    plain = num_floating_point_operations(SimpleNamespace(num_layers=3, moe_layer_freq=[1, 0, 0], **base), 1)
    mtp = num_floating_point_operations(SimpleNamespace(num_layers=2, moe_layer_freq=[1, 0], mtp_num_layers=1, **base), 1)
    assert mtp == plain + extra


def test_mtp_with_moe_logs_both_losses():
    """The MTP layer copies the decoder's last (MoE) layer; its balancing loss is tracked too."""
    run = run_ckpt(1, ["--mtp-num-layers", "1", "--position-embedding-type", "rope", "--num-experts", "4",
                       "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--moe-layer-freq", "[0,1]"], 3)
    lines = [line for line in run.log.splitlines() if " iteration " in line]
    assert len(lines) == 3
    assert all(re.search(r"lm loss: \S+ \| load_balancing_loss: \S+ \| mtp_1 loss: \S+ \|", line) for line in lines)
