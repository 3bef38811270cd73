"""--use-checkpoint-args takes gpt-oss's window pattern and gated-unit options from the
checkpoint even when the command line gives others: they change the logits."""

import argparse

from megatron.training.checkpointing import checkpoint_args


def test_gpt_oss_options_come_from_the_checkpoint(tmp_path, monkeypatch):
    saved = argparse.Namespace(window_attn_skip_freq=[1, 0], glu_linear_offset=1.0, activation_func_clamp_value=7.0)
    monkeypatch.setattr(checkpoint_args, "_checkpoint_dir", lambda args: str(tmp_path))
    monkeypatch.setattr(checkpoint_args, "read_saved_args", lambda directory: saved)
    args = argparse.Namespace(load=str(tmp_path), window_attn_skip_freq=2, glu_linear_offset=0.0,
                              activation_func_clamp_value=None)
    args, _ = checkpoint_args.load_args_from_checkpoint(args)
    assert args.window_attn_skip_freq == [1, 0]
    assert args.glu_linear_offset == 1.0 and args.activation_func_clamp_value == 7.0
