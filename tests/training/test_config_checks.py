"""Rules that only the core configs know (TransformerConfig with its parallel, MoE and FP8
checks; OptimizerConfig) fail during argument checks, before torch.distributed starts, with
the config's one message (megatron/training/config_checks.py)."""

import pytest

from megatron.training import initialize
from megatron.training.arguments import parse_args, parse_and_validate

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 1 --lr 1e-3").split()


def _validate(extra: str, world_size: int = 1):
    return parse_and_validate(BASE + extra.split(), world_size=world_size, rank=0)


@pytest.mark.parametrize("extra, world_size, message", [
    # TransformerConfig's parallel shape: fc1/fc2 are split over tensor-parallel ranks.
    ("--ffn-hidden-size 63 --tensor-model-parallel-size 2", 2, "--ffn-hidden-size 63 is not divisible"),
    # The MoE checks the config runs for MoE models.
    ("--num-experts 4 --moe-router-enable-expert-bias", 1, "--moe-router-enable-expert-bias needs"),
    ("--num-experts 4 --moe-pad-expert-input-to-capacity", 1, "--moe-pad-expert-input-to-capacity needs"),
    # The FP8 recipe checks.
    ("--fp8-format hybrid --fp8-amax-history-len 0", 1, "--fp8-amax-history-len must be a positive"),
    # OptimizerConfig.
    ("--clip-grad -1", 1, "--clip-grad must be >= 0"),
])
def test_config_rules_fail_in_argument_checks(extra, world_size, message):
    with pytest.raises(ValueError, match=message):
        _validate(extra, world_size)


def test_valid_arguments_still_pass():
    args = _validate("--num-experts 4 --moe-router-topk 2 --ffn-hidden-size 64 --clip-grad 0.5")
    assert args.num_experts == 4


def test_query_groups_the_model_cannot_shard_fail_before_distributed_init(monkeypatch):
    """The issue's example: 2 query groups on 4 tensor-parallel ranks used to pass argument
    checks and fail when the model config was built, after torch.distributed had started."""

    def reached(*_):
        raise AssertionError("torch.distributed was initialized before the arguments were refused")

    monkeypatch.setattr(initialize, "_initialize_distributed", reached)
    # initialize_megatron exports torchrun's variables; monkeypatch puts them back afterwards.
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    argv = BASE + "--group-query-attention --num-query-groups 2 --tensor-model-parallel-size 4".split()
    with pytest.raises(ValueError, match=r"^--num-query-groups 2: must be divisible by --tensor-model-parallel-size 4"):
        initialize.initialize_megatron(parsed_args=parse_args(args=argv))
