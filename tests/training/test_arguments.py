"""Command line: Megatron's flag names and defaults, validation errors, derived values, and
translation into core configs. No torch.distributed needed: world size and rank are passed in.
"""

import argparse
import dataclasses
import logging
import re

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training import global_vars
from megatron.training.arguments import build_parser, parse_and_validate, parse_args, validate_args
from megatron.training.arguments_groups.config_help import field_docstrings
from megatron.training.arguments_groups.flag_helpers import int_or_pattern, int_tuple
from megatron.training.config_from_args import (
    build_config,
    core_transformer_config_from_args,
    get_ddp_config,
    get_megatron_optimizer_config,
)

BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2").split()


def validated(extra="", world_size=1, base=BASE):
    return parse_and_validate(list(base) + extra.split(), world_size=world_size, rank=0)


def rejects(extra, flag, world_size=1, value=None):
    """Validation raises ValueError whose message starts by naming ``flag`` (and ``value``)."""
    with pytest.raises(ValueError) as err:
        validated(extra, world_size)
    message = str(err.value)
    assert message.startswith(flag + " "), message
    if value is not None:
        assert repr(value) in message, message
    assert "Fix:" in message
    return message


# Expected values are Megatron-LM's defaults as listed in megatron-facts.md (sections 1, 5, 9).
MEGATRON_DEFAULTS = {
    "num_layers": None, "hidden_size": None, "ffn_hidden_size": None, "kv_channels": None,
    "num_query_groups": 1, "group_query_attention": False, "max_position_embeddings": None,
    "position_embedding_type": "learned_absolute", "rotary_base": 10000, "rotary_percent": 1.0,
    "rope_scaling_factor": 8.0, "normalization": "LayerNorm", "norm_epsilon": 1e-5,
    "make_vocab_size_divisible_by": 128, "add_bias_linear": True, "add_qkv_bias": False,
    "swiglu": False, "untie_embeddings_and_output_weights": False,
    "attention_backend": "auto", "transformer_impl": "transformer_engine",
    "hidden_dropout": 0.1, "attention_dropout": 0.1, "weight_decay": 0.01, "clip_grad": 1.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "sgd_momentum": 0.9,
    "weight_decay_incr_style": "constant", "optimizer": "adam",
    "micro_batch_size": None, "global_batch_size": None, "rampup_batch_size": None,
    "train_iters": None, "train_samples": None, "log_interval": 100, "exit_signal_handler": False,
    "recompute_granularity": None, "dataloader_type": None, "empty_unused_memory_level": 0,
    "check_for_nan_in_loss_and_grad": True, "masked_softmax_fusion": True,
    "gradient_accumulation_fusion": True,
    "seed": 1234, "init_method_std": 0.02, "data_parallel_random_init": False,
    "lr": None, "lr_decay_style": "linear", "lr_warmup_iters": 0, "lr_warmup_samples": 0,
    "lr_warmup_fraction": None, "lr_warmup_init": 0.0, "min_lr": 0.0,
    "lr_wsd_decay_style": "exponential",
    "save": None, "save_interval": None, "load": None, "finetune": False, "ckpt_format": "torch_dist",
    "dist_ckpt_strictness": "assume_ok_unexpected", "async_save": False,
    "fp16": False, "bf16": False, "loss_scale": None, "initial_loss_scale": 2**32,
    "min_loss_scale": 1.0, "loss_scale_window": 1000, "hysteresis": 2,
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
    "expert_model_parallel_size": 1, "expert_tensor_parallel_size": None, "sequence_parallel": False,
    "cp_comm_type": ["p2p"], "distributed_backend": "nccl", "distributed_timeout_minutes": 10,
    "use_distributed_optimizer": False, "overlap_p2p_comm": True, "align_param_gather": True,
    "eval_iters": 100, "eval_interval": None, "skip_train": False,
    "data_path": None, "split": None, "num_workers": 2, "mock_data": False, "mmap_bin_files": True,
    "create_attention_mask_in_dataloader": True, "mask_prob": 0.15, "short_seq_prob": 0.1,
    "mid_level_dataset_surplus": 0.005,
    "tokenizer_type": None, "vocab_extra_ids": 0, "tiktoken_num_special_tokens": 1000,
    "null_tokenizer_pad_id": -1,
    "timing_log_level": 0, "timing_log_option": "minmax", "tensorboard_log_interval": 1,
    "tensorboard_queue_size": 1000, "wandb_project": "", "log_throughput": False,
    "num_experts": None, "moe_router_topk": 2, "moe_aux_loss_coeff": 0.0,
    "moe_token_dispatcher_type": "allgather", "moe_router_load_balancing_type": "aux_loss",
    "moe_layer_freq": 1, "moe_token_drop_policy": "probs",
    "profile_step_start": 10, "profile_step_end": 12, "rerun_mode": "validate_results",
}


def test_defaults_are_megatrons():
    args = parse_args(args=[])
    wrong = {k: (getattr(args, k, "<missing>"), v) for k, v in MEGATRON_DEFAULTS.items()
             if getattr(args, k, "<missing>") != v or type(getattr(args, k, None)) is not type(v)}
    assert not wrong, f"(got, expected): {wrong}"


@pytest.mark.parametrize("flag", ["--override-opt_param-scheduler", "--override-opt-param-scheduler"])
def test_old_spellings_are_aliases(flag):
    assert parse_args(args=[flag]).override_opt_param_scheduler is True
    assert parse_args(args=["--persistent-save-interval", "7"]).save_interval == 7
    assert parse_args(args=["--tiktoken-special-tokens", "<s>"]).tokenizer_special_tokens == ["<s>"]


def test_off_switches_have_both_spellings():
    assert parse_args(args=["--no-check-for-nan-in-loss-and-grad"]).check_for_nan_in_loss_and_grad is False
    assert parse_args(args=["--disable-check-for-nan-in-loss-and-grad"]).check_for_nan_in_loss_and_grad is False
    assert parse_args(args=["--disable-bias-linear"]).add_bias_linear is False


README_COMMAND = (
    "--tensor-model-parallel-size 2 --num-layers 24 --hidden-size 2048 --num-attention-heads 16 "
    "--seq-length 4096 --max-position-embeddings 4096 --micro-batch-size 1 --global-batch-size 64 "
    "--train-iters 1000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 100 "
    "--bf16 --mock-data --tokenizer-type NullTokenizer --vocab-size 131072 --log-interval 10 --log-throughput"
)

# Megatron-LM's examples/gpt3 175B launch flags (paths shortened): sample-based, with a ramp.
GPT3_175B_COMMAND = (
    "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 --num-layers 96 --hidden-size 12288 "
    "--num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 1 "
    "--global-batch-size 1536 --rampup-batch-size 16 16 5859375 --train-samples 146484375 "
    "--lr-decay-samples 126953125 --lr-warmup-samples 183105 --lr 6.0e-5 --min-lr 6.0e-6 "
    "--lr-decay-style cosine --log-interval 100 --eval-iters 40 --eval-interval 1000 "
    "--data-path /data/my-gpt3_00_text_document --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt "
    "--split 98,2,0 --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 "
    "--init-method-std 0.006 --tensorboard-dir /tb --fp16 --attention-backend auto "
    "--save-interval 10000 --save /ckpt --load /ckpt"
)


def test_readme_command_line_parses_and_validates():
    args = parse_and_validate(README_COMMAND.split(), world_size=8, rank=0)
    assert (args.data_parallel_size, args.global_batch_size, args.params_dtype) == (4, 64, torch.bfloat16)
    assert args.lr_decay_style == "cosine" and args.vocab_size == 131072 and args.log_throughput
    assert args.accumulate_allreduce_grads_in_fp32 is True  # implied by --bf16, as in Megatron
    assert args.ffn_hidden_size == 4 * 2048 and args.kv_channels == 128


def test_gpt3_175b_command_line_parses_and_validates():
    args = parse_and_validate(GPT3_175B_COMMAND.split(), world_size=1024, rank=0)
    assert args.data_parallel_size == 1024 // (8 * 16)
    assert args.rampup_batch_size == [16, 16, 5859375]
    assert args.params_dtype == torch.float16
    assert args.check_for_nan_in_loss_and_grad is False  # fp16 dynamic loss scaling
    assert args.split == "98,2,0" and args.data_path == ["/data/my-gpt3_00_text_document"]


@pytest.mark.parametrize("typo, expected", [("--num-layer", "--num-layers"), ("--hiden-size", "--hidden-size"),
                                            ("--micro-batch-sise=2", "--micro-batch-size")])
def test_misspelled_flag_exits_2_and_suggests(typo, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args=[typo, "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    hint = [line for line in err.splitlines() if line.strip().startswith(typo.split("=")[0] + ":")]
    assert hint and f"did you mean {expected}" in hint[0], err


def test_ignore_unknown_args():
    args = parse_args(ignore_unknown_args=True, args=["--num-layers", "3", "--not-a-flag", "x"])
    assert args.num_layers == 3


def test_extra_args_provider():
    def extra(parser):
        parser.add_argument_group(title="mine").add_argument("--my-flag", type=int, default=5, help="mine")
        return parser

    assert parse_args(extra, args=["--my-flag", "6"]).my_flag == 6


def test_every_flag_has_help_and_config_flags_reuse_field_docstrings():
    parser = build_parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not missing
    docs = field_docstrings(TransformerConfig)
    by_dest = {a.dest: a for a in parser._actions}
    assert by_dest["num_layers"].help == re.sub(r"\s*\(--num-layers\)", "", docs["num_layers"])
    assert by_dest["norm_epsilon"].help == re.sub(r"\s*\(--norm-epsilon\)", "", docs["layernorm_epsilon"])
    # ModelParallelConfig (a base class) is read too.
    assert "tensor_model_parallel_size" in docs


def test_field_docstrings_reads_the_string_after_each_field():
    @dataclasses.dataclass
    class Base:
        a: int = 1
        """Alpha  value."""

    @dataclasses.dataclass
    class Child(Base):
        b: int = 2
        c: int = 3
        """Gamma."""

    assert field_docstrings(Child) == {"a": "Alpha value.", "c": "Gamma."}


# ---------------------------------------------------------------- validation rules

def test_world_not_divisible_by_model_parallel():
    rejects("--tensor-model-parallel-size 2", "--tensor-model-parallel-size", world_size=3, value=2)


def test_heads_not_divisible_by_tp():
    rejects("--tensor-model-parallel-size 3", "--num-attention-heads", world_size=3, value=4)


def test_hidden_not_divisible_by_heads():
    rejects("--hidden-size 66", "--hidden-size", value=66)
    assert validated("--hidden-size 66 --kv-channels 16").kv_channels == 16


def test_query_groups_rules():
    rejects("--group-query-attention --num-query-groups 3", "--num-query-groups", value=3)
    # 4 groups on TP 3: neither a multiple nor a divisor.
    rejects("--group-query-attention --num-query-groups 4 --num-attention-heads 12 --hidden-size 96 "
            "--tensor-model-parallel-size 3", "--num-query-groups", world_size=3, value=4)
    # Megatron allows TP to be a multiple of the groups (KV heads replicated); the attention
    # here does not replicate them (docs/compatibility.md), so argument checks refuse it
    # rather than the model config after torch.distributed has started.
    rejects("--group-query-attention --num-query-groups 1 --tensor-model-parallel-size 2", "--num-query-groups",
            world_size=2, value=1)
    assert validated("--group-query-attention --num-query-groups 2 --tensor-model-parallel-size 2",
                     world_size=2).num_query_groups == 2


def test_missing_required_sizes():
    with pytest.raises(ValueError, match=r"^--micro-batch-size None"):
        parse_and_validate(BASE[:-2], world_size=1, rank=0)
    with pytest.raises(ValueError, match=r"^--max-position-embeddings None"):
        parse_and_validate([t for i, t in enumerate(BASE) if i not in (8, 9)], world_size=1, rank=0)


def test_seq_length_exceeds_positions():
    rejects("--seq-length 64", "--seq-length", value=64)


def test_global_batch_divisibility():
    rejects("--global-batch-size 6", "--global-batch-size", world_size=2, value=6)
    assert validated("--global-batch-size 6 --decrease-batch-size-if-needed", world_size=2).global_batch_size == 6
    assert validated("", world_size=2).global_batch_size == 4  # default mbs * dp


def test_fp16_and_bf16_exclusive():
    rejects("--fp16 --bf16", "--bf16")


def test_train_iters_and_samples_exclusive():
    rejects("--train-iters 10 --train-samples 100", "--train-samples", value=100)


@pytest.mark.parametrize("extra, flag", [
    ("--train-iters 10 --lr-warmup-samples 5", "--lr-warmup-samples"),
    ("--train-iters 10 --lr-decay-samples 50", "--lr-decay-samples"),
    ("--train-iters 10 --rampup-batch-size 2 2 10", "--rampup-batch-size"),
    ("--train-samples 100 --lr-warmup-iters 5", "--lr-warmup-iters"),
    ("--train-samples 100 --lr-decay-iters 5", "--lr-decay-iters"),
    ("--train-iters 10 --lr-warmup-fraction 0.1 --lr-warmup-iters 2", "--lr-warmup-iters"),
    ("--train-samples 100 --lr-warmup-fraction 0.1 --lr-warmup-samples 2", "--lr-warmup-samples"),
])
def test_iteration_and_sample_schedules_do_not_mix(extra, flag):
    rejects(extra, flag)


def test_min_lr_above_lr():
    rejects("--lr 1e-4 --min-lr 1e-3", "--min-lr", value=1e-3)


def test_weight_decay_schedule():
    rejects("--start-weight-decay 0.1", "--start-weight-decay")
    rejects("--weight-decay-incr-style linear", "--weight-decay-incr-style")
    args = validated("--weight-decay 0.05")
    assert (args.start_weight_decay, args.end_weight_decay) == (0.05, 0.05)


def test_sequence_parallel_at_tp1_warns_and_derives_false(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron.training.derived_args"):
        args = validated("--sequence-parallel")
    assert args.sequence_parallel is False
    assert any("sequence-parallel" in r.getMessage() for r in caplog.records)
    assert validated("--sequence-parallel --tensor-model-parallel-size 2", world_size=2).sequence_parallel is True


def test_pipeline_layer_divisibility():
    rejects("--num-layers 3 --pipeline-model-parallel-size 2", "--num-layers", world_size=2, value=3)
    rejects("--num-layers 8 --pipeline-model-parallel-size 4 --decoder-first-pipeline-num-layers 1 "
            "--decoder-last-pipeline-num-layers 2", "--decoder-first-pipeline-num-layers", world_size=4)
    ok = validated("--num-layers 7 --pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 1 "
                   "--decoder-last-pipeline-num-layers 2", world_size=3)
    assert ok.virtual_pipeline_model_parallel_size is None


def test_virtual_pipeline_rules():
    args = validated("--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 "
                     "--global-batch-size 4", world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2
    assert args.microbatch_group_size_per_virtual_pipeline_stage == 2
    one = validated("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 1",
                    world_size=2)
    assert one.virtual_pipeline_model_parallel_size is None and one.overlap_p2p_comm is False
    # The schedule reads the p2p overlap from the model config: on with VPP (the default), off without.
    from megatron.training.config_from_args import core_transformer_config_from_args
    for parsed, overlap in ((args, True), (one, False)):
        parsed.params_dtype = torch.float32
        config = core_transformer_config_from_args(parsed)
        assert (config.overlap_p2p_comm, config.batch_p2p_comm) == (overlap, not overlap)
    rejects("--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3",
            "--num-layers-per-virtual-pipeline-stage", world_size=2, value=3)
    rejects("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 3",
            "--num-virtual-stages-per-pipeline-rank", world_size=2, value=3)
    rejects("--num-layers 8 --num-virtual-stages-per-pipeline-rank 2", "--pipeline-model-parallel-size")
    rejects("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
            "--no-overlap-p2p-communication", "--pipeline-model-parallel-size", world_size=2)
    rejects("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
            "--num-layers-per-virtual-pipeline-stage 2", "--num-virtual-stages-per-pipeline-rank", world_size=2)


def test_recompute_rules():
    rejects("--recompute-granularity selective --recompute-method uniform", "--recompute-method")
    rejects("--recompute-granularity full", "--recompute-granularity")
    rejects("--recompute-granularity full --recompute-method uniform --recompute-num-layers 9",
            "--recompute-num-layers", value=9)
    rejects("--recompute-granularity full --recompute-method block --recompute-num-layers 1 "
            "--distribute-saved-activations", "--distribute-saved-activations")
    assert validated("--recompute-activations").recompute_granularity == "selective"


def test_checkpoint_and_feature_rules():
    rejects("--save /tmp/x", "--save-interval")
    rejects("--async-save --ckpt-format torch --save /tmp/x --save-interval 5", "--async-save")
    rejects("--overlap-param-gather --overlap-grad-reduce", "--overlap-param-gather")
    rejects("--expert-model-parallel-size 2", "--expert-model-parallel-size", world_size=2)
    rejects("--swiglu --squared-relu", "--squared-relu")


def test_validation_changes_only_none_values_and_documented_overrides():
    documented = {"sequence_parallel", "overlap_p2p_comm", "align_param_gather", "add_qkv_bias",
                  "bias_gelu_fusion", "apply_rope_fusion", "accumulate_allreduce_grads_in_fp32",
                  "check_for_nan_in_loss_and_grad", "rank", "world_size"}
    args = parse_args(args=BASE + "--sequence-parallel --fp16 --num-layers 8 --pipeline-model-parallel-size 2 "
                      "--data-path d --weight-decay 0.2".split())
    before = dict(vars(args))
    validate_args(args, world_size=2, rank=0)
    changed = {k for k, v in before.items() if vars(args)[k] != v}
    assert changed - documented == {k for k in changed - documented if before[k] is None}
    assert {"ffn_hidden_size", "kv_channels", "split", "global_batch_size"} <= changed


def test_derived_values():
    args = validated("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --bf16", world_size=8)
    assert (args.world_size, args.rank, args.data_parallel_size) == (8, 0, 2)
    assert args.expert_tensor_parallel_size == 2 and args.params_dtype == torch.bfloat16
    assert (args.consumed_train_samples, args.consumed_valid_samples, args.skipped_train_samples) == (0, 0, 0)
    assert args.variable_seq_lengths is False and args.dataloader_type == "single"
    assert args.use_dist_ckpt is True and args.eval_interval is None


def test_world_size_and_rank_come_from_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    args = validate_args(parse_args(args=BASE))
    assert (args.world_size, args.rank, args.data_parallel_size) == (4, 3, 4)


def test_script_defaults_fill_only_unset_values():
    args = validate_args(parse_args(args=BASE + ["--tokenizer-type", "NullTokenizer"]),
                         {"tokenizer_type": "GPT2BPETokenizer", "vocab_extra_ids": 5}, world_size=1, rank=0)
    assert args.tokenizer_type == "NullTokenizer"  # the command line wins
    assert args.vocab_extra_ids == 0  # not None, so the script default does not apply


# ---------------------------------------------------------------- config translation

LLAMA = ("--swiglu --normalization RMSNorm --disable-bias-linear --group-query-attention --num-query-groups 2 "
         "--untie-embeddings-and-output-weights --position-embedding-type rope --norm-epsilon 1e-6 "
         "--hidden-size 256 --num-attention-heads 8")


def test_llama_flags_translate_to_transformer_config():
    args = validated(LLAMA)
    config = core_transformer_config_from_args(args)
    assert config.gated_linear_unit is True and config.activation_func is F.silu
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-6
    assert config.add_bias_linear is False and config.add_qkv_bias is False
    assert config.num_query_groups == 2 and config.num_attention_heads == 8
    # Megatron's SwiGLU default: int(4h * 2/3 / 64) * 64 = int(682.67 / 64) * 64 = 640.
    assert config.ffn_hidden_size == args.ffn_hidden_size == 640
    assert config.kv_channels == 32 and args.untie_embeddings_and_output_weights is True


def test_gpt_flags_translate_to_transformer_config():
    config = core_transformer_config_from_args(validated("--apply-layernorm-1p --hidden-dropout 0.0"))
    assert config.num_query_groups == 4  # no GQA: one group per head (--num-query-groups ignored)
    assert config.add_bias_linear is True and config.gated_linear_unit is False
    assert config.layernorm_zero_centered_gamma is True and config.hidden_dropout == 0.0
    assert config.params_dtype == torch.float32 and config.use_cpu_initialization is False
    assert config.attention_softmax_in_fp32 is True  # the flag only turns it on; the default stays


def test_other_activations_and_window():
    squared = core_transformer_config_from_args(validated("--squared-relu"))
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(squared.activation_func(x), torch.tensor([0.0, 4.0]))
    gelu = core_transformer_config_from_args(validated("--openai-gelu"))
    assert torch.allclose(gelu.activation_func(x), F.gelu(x, approximate="tanh"))
    window = core_transformer_config_from_args(validated("--window-size 16,0"))
    assert window.window_size == (16, 0)


def test_optimizer_and_ddp_configs():
    args = validated("--lr 3e-4 --min-lr 3e-5 --bf16 --adam-beta2 0.95 --clip-grad 0.5 --use-distributed-optimizer "
                     "--ddp-bucket-size 1000 --no-check-for-nan-in-loss-and-grad --overlap-grad-reduce")
    opt = get_megatron_optimizer_config(args)
    assert (opt.lr, opt.min_lr, opt.adam_beta2, opt.clip_grad, opt.bf16) == (3e-4, 3e-5, 0.95, 0.5, True)
    assert opt.use_distributed_optimizer is True and opt.initial_loss_scale == 2**32
    ddp = get_ddp_config(args)
    assert ddp.grad_reduce_in_fp32 is True and ddp.bucket_size == 1000
    assert ddp.check_for_nan_in_grad is False and ddp.overlap_grad_reduce is True


def test_build_config_passes_only_known_fields_and_keeps_defaults_for_none():
    @dataclasses.dataclass
    class Cfg:
        lr: float = 1.0
        flag: bool = False
        maybe: object = None

    args = argparse.Namespace(lr=0.5, flag=None, maybe=None, unrelated=3)
    assert build_config(Cfg, args, {"flag": True, "not_a_field": 1}) == Cfg(lr=0.5, flag=True, maybe=None)
    assert build_config(Cfg, args) == Cfg(lr=0.5, flag=False)


def test_pattern_and_tuple_types():
    assert int_or_pattern("4") == 4
    assert int_or_pattern("([1]*3+[0])*2") == [1, 1, 1, 0, 1, 1, 1, 0]
    assert int_tuple("(4096, 0)") == (4096, 0)
    with pytest.raises(argparse.ArgumentTypeError):
        int_or_pattern("__import__('os')")


# ---------------------------------------------------------------- global variables

def test_global_variables():
    global_vars.unset_global_variables()
    with pytest.raises(RuntimeError, match="not initialized"):
        global_vars.get_args()
    args = validated()
    global_vars.set_global_variables(args)
    try:
        assert global_vars.get_args() is args
        assert global_vars.get_tensorboard_writer() is None and global_vars.get_wandb_writer() is None
        with pytest.raises(RuntimeError):
            global_vars.get_tokenizer()
        global_vars.set_tokenizer("tok")
        assert global_vars.get_tokenizer() == "tok"
    finally:
        global_vars.unset_global_variables()
    with pytest.raises(RuntimeError):
        global_vars.get_args()
