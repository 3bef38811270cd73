"""--use-checkpoint-args takes the architecture from the checkpoint under --load.

A tiny LLaMA-style GPT (SwiGLU, RMSNorm, RoPE, grouped-query attention, untied embeddings,
no biases) is saved at iteration 3. A run that passes none of those switches resumes from
it with --use-checkpoint-args and gets the losses of a run that passes them all: without
the copy its model would not match the checkpoint at all. Sizes given on the command line
win over the checkpoint's; switches do not (Megatron's rule); the parallel sizes come along
only with --use-mp-args-from-checkpoint-args.
"""

import logging

import pytest

from megatron.training.arguments import parse_args, validate_args
from megatron.training.checkpointing import CheckpointError
from megatron.training.checkpointing.checkpoint_args import load_args_from_checkpoint, read_saved_args
from tests.training.gpt_runs import losses, run_gpt

LLAMA = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
         "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
         "--disable-bias-linear"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_ckpt")
    run_gpt(1, LLAMA + ["--save", str(root), "--save-interval", "3", "--exit-interval", "3"], iters=5)
    return root


def _resume(root, extra):
    return losses(run_gpt(1, ["--load", str(root)] + extra, iters=5))


def test_resume_without_architecture_flags_equals_resume_with_them(saved):
    explicit = _resume(saved, LLAMA)
    from_checkpoint = _resume(saved, ["--use-checkpoint-args"])
    assert len(explicit) == 2
    assert from_checkpoint == explicit


def _args(argv):
    return parse_args(args=argv)


def test_sizes_fill_only_what_is_unset_and_switches_are_forced(saved, caplog):
    args = _args(["--use-checkpoint-args", "--load", str(saved), "--hidden-size", "96",
                  "--normalization", "LayerNorm", "--micro-batch-size", "2"])
    with caplog.at_level(logging.INFO):
        args, saved_args = load_args_from_checkpoint(args)
    assert (args.num_layers, args.num_attention_heads, args.seq_length) == (2, 4, 32)
    assert args.hidden_size == 96  # given on the command line: kept
    assert args.normalization == "RMSNorm" and args.swiglu and args.group_query_attention
    assert args.num_query_groups == 2 and args.untie_embeddings_and_output_weights
    assert args.tensor_model_parallel_size == 1  # parallel sizes only on request
    assert saved_args.hidden_size == 64
    assert "normalization = 'RMSNorm'" in caplog.text
    assert "rotary_base = 10000" in caplog.text  # taken, though equal to the command line's default
    validate_args(args, world_size=1, rank=0)


def test_model_parallel_sizes_on_request(tmp_path):
    root = tmp_path / "tp2"
    run_gpt(2, ["--tensor-model-parallel-size", "2", "--ckpt-format", "torch", "--save", str(root),
                "--save-interval", "3"], iters=3)
    assert read_saved_args(str(root / "iter_0000003")).tensor_model_parallel_size == 2
    plain, _ = load_args_from_checkpoint(_args(["--use-checkpoint-args", "--load", str(root)]))
    assert plain.tensor_model_parallel_size == 1
    with_mp, _ = load_args_from_checkpoint(_args(["--use-checkpoint-args", "--use-mp-args-from-checkpoint-args",
                                                  "--load", str(root)]))
    assert with_mp.tensor_model_parallel_size == 2


def test_missing_load_or_checkpoint(tmp_path, caplog):
    with pytest.raises(ValueError, match="--use-checkpoint-args needs --load"):
        load_args_from_checkpoint(_args(["--use-checkpoint-args"]))
    with caplog.at_level(logging.WARNING):
        args, saved_args = load_args_from_checkpoint(_args(["--use-checkpoint-args", "--load", str(tmp_path)]))
    assert saved_args is None and args.num_layers is None
    assert "no checkpoint at" in caplog.text
    with pytest.raises(CheckpointError, match="--exit-on-missing-checkpoint"):
        load_args_from_checkpoint(_args(["--use-checkpoint-args", "--load", str(tmp_path),
                                         "--exit-on-missing-checkpoint"]))


def test_ckpt_convert_format_saves_the_loaded_state_in_the_other_format(saved, tmp_path):
    """--ckpt-convert-format torch: the torch_dist checkpoint of iteration 3 is written again
    as Megatron's torch format under <--ckpt-convert-save>/torch, and resuming from either
    gives the same losses."""
    out = tmp_path / "converted"
    log = run_gpt(1, LLAMA + ["--load", str(saved), "--ckpt-convert-format", "torch",
                              "--ckpt-convert-save", str(out)], iters=5)
    assert losses(log) == []  # converted and exited, no training
    assert (out / "torch" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert (out / "torch" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    from_converted = _resume(out / "torch", LLAMA + ["--ckpt-format", "torch"])
    assert from_converted == _resume(saved, LLAMA)
    with pytest.raises(ValueError, match="--ckpt-convert-format.*add --load DIR"):
        validate_args(_args(["--ckpt-convert-format", "torch", "--ckpt-convert-save", str(out), "--num-layers", "2",
                             "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                             "--max-position-embeddings", "32",
                             "--micro-batch-size", "2"]), world_size=1, rank=0)


@pytest.mark.parametrize("saved_type,given,expected", [
    ("NullTokenizer", ["--tokenizer-type", "BertWordPieceLowerCase"], "BertWordPieceLowerCase"),
    ("NullTokenizer", [], "NullTokenizer"),
    ("GPT2BPETokenizer", ["--tokenizer-type", "BertWordPieceLowerCase"], "GPT2BPETokenizer"),
])
def test_a_given_tokenizer_replaces_only_an_imported_checkpoints_null_tokenizer(tmp_path, monkeypatch, saved_type,
                                                                                given, expected):
    from argparse import Namespace

    from megatron.training.checkpointing import checkpoint_args

    monkeypatch.setattr(checkpoint_args, "_checkpoint_dir", lambda args: str(tmp_path))
    monkeypatch.setattr(checkpoint_args, "read_saved_args", lambda directory: Namespace(
        tokenizer_type=saved_type, transformer_block_type="post_ln", bert_binary_head=False, bias_gelu_fusion=False))
    args, _ = load_args_from_checkpoint(_args(["--use-checkpoint-args", "--load", str(tmp_path)] + given))
    assert args.tokenizer_type == expected
    # BERT's architecture switches come along (an imported Hugging Face BERT is post-LayerNorm)
    assert (args.transformer_block_type, args.bert_binary_head, args.bias_gelu_fusion) == ("post_ln", False, False)
