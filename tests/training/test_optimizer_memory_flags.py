"""The optimizer-memory flags end to end: --use-precision-aware-optimizer with its dtype
flags and --optimizer-cpu-offload parse into OptimizerConfig with Megatron's rules, train
pretrain_gpt on two data-parallel ranks, and resume from a checkpoint exactly.

Exactness of the resume: the checkpoint holds the unscaled fp32 optimizer state; bf16
moments re-stored from it are the same bf16 values, so the resumed run's losses equal the
uninterrupted run's to the last printed digit.
"""

import pytest
import torch

from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import get_megatron_optimizer_config
from megatron.training.memory_estimate import optimizer_bytes_per_param
from megatron.training.startup_summary import describe_precision
from tests.training.gpt_runs import losses, run_gpt

BASE = "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 " \
       "--micro-batch-size 2 --lr 1e-3".split()
PA = ["--bf16", "--use-distributed-optimizer", "--use-precision-aware-optimizer"]
MEMORY = PA + ["--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "fp8", "--main-grads-dtype", "bf16",
               "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"]


def test_flags_reach_the_optimizer_config():
    args = parse_and_validate(BASE + MEMORY + ["--no-pin-cpu-grads"])
    config = get_megatron_optimizer_config(args)
    assert (config.exp_avg_dtype, config.exp_avg_sq_dtype) == (torch.bfloat16, torch.uint8)
    assert config.main_grads_dtype == torch.bfloat16 and config.main_params_dtype == torch.float32
    assert config.optimizer_cpu_offload and config.optimizer_offload_fraction == 0.5
    assert config.pin_cpu_grads is False and config.pin_cpu_params is True
    # As Megatron: bf16 main grads keep the DDP grad buffers in bf16.
    assert args.accumulate_allreduce_grads_in_fp32 is False
    # Device bytes per param: (fp32 main 4 + bf16 exp_avg 2 + fp8 exp_avg_sq 1) x half left on the device.
    assert optimizer_bytes_per_param(args) == 3.5
    assert "moments bf16/fp8, 50% of its state on the CPU" in describe_precision(args)


@pytest.mark.parametrize("extra, message", [
    (["--bf16", "--use-precision-aware-optimizer"], "needs --use-distributed-optimizer"),
    (["--exp-avg-dtype", "fp8"], "--exp-avg-dtype fp8 needs --use-precision-aware-optimizer"),
    (["--optimizer-cpu-offload"], "--optimizer-cpu-offload must be used with --use-precision-aware-optimizer"),
    (PA + ["--main-grads-dtype", "bf16", "--accumulate-allreduce-grads-in-fp32"], "contradicts"),
])
def test_megatron_rules_fail_at_parse_time(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_and_validate(BASE + extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizer_memory")
    flags = MEMORY  # the default torch_dist format: model-space optimizer state
    straight = run_gpt(2, flags, iters=4)
    run_gpt(2, flags + ["--save", str(root), "--save-interval", "2", "--exit-interval", "2"], iters=4)
    resumed = run_gpt(2, flags + ["--load", str(root)], iters=4)
    return losses(straight), losses(resumed)


def test_low_precision_offloaded_training_resumes_exactly(runs):
    straight, resumed = runs
    assert len(straight) == 4 and len(resumed) == 2
    assert all(loss == loss and loss < 7.0 for loss in straight)  # finite, near ln(512) = 6.24
    assert resumed == straight[2:]
