"""Megatron-Core's simple training loop (examples/megatron_core/simple_train_loop.py) runs
here on 2 tensor-parallel ranks over gloo: the loss falls and the distributed checkpoint it
saves loads back exactly into a freshly initialized model."""

import importlib.util
import pathlib

from tests.multirank import run_on_ranks

_EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "megatron_core" / "simple_train_loop.py"


def _run_example(rank, world_size, checkpoint_dir):
    spec = importlib.util.spec_from_file_location("simple_train_loop", _EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.main(checkpoint_dir, steps=3, tensor_model_parallel_size=2)


def test_simple_train_loop_on_two_ranks(tmp_path):
    results = run_on_ranks(_run_example, world_size=2, args=(str(tmp_path / "ckpt"),))
    (losses, reloaded, same_before), other = results
    assert other[0] == losses, "tensor-parallel ranks must see the same loss"
    assert losses[-1] < losses[0]
    assert not same_before and reloaded
    assert reloaded and other[1]
