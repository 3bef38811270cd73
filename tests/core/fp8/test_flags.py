"""The --fp8-* flags: Megatron's spellings and defaults reach TransformerConfig; the
recipes Hopper cannot run are refused naming the flag."""

import re

import pytest

from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import core_transformer_config_from_args, get_ddp_config

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1", "--bf16"]


def _config(*flags):
    return core_transformer_config_from_args(parse_and_validate(BASE + list(flags)))


def test_defaults_are_megatrons_and_fp8_is_off():
    config = _config()
    assert config.fp8 is None and config.fp8_recipe == "delayed" and config.fp8_margin == 0
    assert config.fp8_amax_history_len == 1 and config.fp8_amax_compute_algo == "most_recent"
    assert config.fp8_wgrad and not config.first_last_layers_bf16
    assert config.num_layers_at_start_in_bf16 == 1 and config.num_layers_at_end_in_bf16 == 1


def test_flags_reach_the_config():
    config = _config("--fp8-format", "e4m3", "--fp8-recipe", "tensorwise", "--fp8-margin", "2",
                     "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "max", "--no-fp8-wgrad",
                     "--fp8-emulation", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2",
                     "--num-layers-at-end-in-bf16", "0")
    assert (config.fp8, config.fp8_recipe, config.fp8_margin) == ("e4m3", "tensorwise", 2)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (16, "max")
    assert not config.fp8_wgrad and config.fp8_emulation and config.first_last_layers_bf16
    assert (config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (2, 0)


@pytest.mark.parametrize("recipe", ["mxfp8", "blockwise", "custom"])
def test_recipes_hopper_cannot_run_are_refused(recipe):
    with pytest.raises(ValueError, match=f"--fp8-recipe {recipe} is not supported: .*use --fp8-recipe delayed"):
        _config("--fp8-format", "hybrid", "--fp8-recipe", recipe)


def test_fp8_param_gather_reaches_the_configs():
    args = parse_and_validate(BASE + ["--fp8-format", "hybrid", "--fp8-param-gather", "--use-distributed-optimizer"])
    assert core_transformer_config_from_args(args).fp8_param
    assert get_ddp_config(args).fp8_param_gather
    assert not get_ddp_config(parse_and_validate(BASE)).fp8_param_gather


@pytest.mark.parametrize("flags, rule", [
    ([], "needs FP8 training. Fix: add --fp8-format hybrid"),
    (["--fp8-format", "hybrid"], "needs --use-distributed-optimizer"),
    (["--fp8-format", "hybrid", "--use-torch-fsdp2", "--untie-embeddings-and-output-weights"],
     "FSDP2 gathers params in their own dtype here. Fix: use --use-distributed-optimizer instead"),
    (["--fp8-format", "hybrid", "--use-distributed-optimizer", "--use-precision-aware-optimizer"],
     "is not combined with --use-precision-aware-optimizer"),
    (["--fp8-format", "hybrid", "--use-distributed-optimizer", "--cuda-graph-impl", "full_iteration"],
     "is not captured by full-iteration CUDA graphs"),
])
def test_fp8_param_gather_validation_names_the_flag(flags, rule):
    with pytest.raises(ValueError, match=r"^--fp8-param-gather True: .*" + re.escape(rule)):
        parse_and_validate(BASE + ["--fp8-param-gather"] + flags)


def test_fp8_param_gather_core_configs_refuse_without_fp8_or_the_distributed_optimizer():
    with pytest.raises(ValueError, match="--fp8-param-gather .*needs FP8 training"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, fp8_param=True)
    with pytest.raises(ValueError, match="--fp8-param-gather needs --use-distributed-optimizer"):
        DistributedDataParallelConfig(fp8_param_gather=True)
