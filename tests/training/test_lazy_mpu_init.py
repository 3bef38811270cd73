"""--lazy-mpu-init: initialize_megatron installs the flags and returns the function that
completes the initialization; nothing distributed exists until it is called."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
from megatron.training import initialize
from megatron.training.arguments import parse_args
from megatron.training.global_vars import get_args, unset_global_variables

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "1",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--distributed-backend", "gloo"]


@pytest.fixture
def one_process(monkeypatch):
    """A lone process (world 1) on a free port; its process groups and global args are
    released afterwards (monkeypatch restores what initialize_megatron exports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(port))):
        monkeypatch.setenv(name, value)
    assert not dist.is_initialized()
    yield
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    unset_global_variables()
    destroy_num_microbatches_calculator()


def test_returns_the_finisher_and_initializes_nothing_before_it_is_called(one_process):
    finish = initialize.initialize_megatron(parsed_args=parse_args(args=BASE + ["--lazy-mpu-init", "True"]))
    assert callable(finish)
    assert get_args().use_cpu_initialization is True  # implied by the flag
    assert not dist.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    assert finish() is None
    assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_process_groups().size("tp") == 1


def test_the_finisher_uses_a_process_group_its_caller_started(one_process):
    """The launcher's own torch.distributed is kept; only the model-parallel groups are added."""
    finish = initialize.initialize_megatron(parsed_args=parse_args(args=BASE + ["--lazy-mpu-init"]))
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    group = dist.group.WORLD
    finish()
    assert dist.group.WORLD is group
    assert parallel_state.model_parallel_is_initialized()


def test_without_the_flag_initialization_completes_and_returns_the_arguments(one_process):
    args = initialize.initialize_megatron(parsed_args=parse_args(args=BASE + ["--lazy-mpu-init", "False"]))
    assert args is get_args() and args.lazy_mpu_init is False
    assert not args.use_cpu_initialization
    assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
