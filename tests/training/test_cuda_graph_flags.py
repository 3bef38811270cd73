"""--cuda-graph-impl / --cuda-graph-scope / --cuda-graph-warmup-steps: Megatron's defaults,
what the full-iteration graph accepts and refuses (naming the flag), the clean refusal on a
machine without CUDA, and the static micro-batch buffers the replays refill."""

import re

import pytest
import torch

from megatron.core.full_cuda_graph import CudaGraphCaptureError, _clone_reports, _copy_into, _DeferredFinalize
from megatron.training.arguments import parse_and_validate
from megatron.training.cuda_graph_args import as_user_errors, full_iteration_graph
from megatron.training.user_errors import UserError
from tests.training.test_user_errors import TINY, _clean_failure, _run

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --micro-batch-size 2").split()


def _args(extra="", world_size=1):
    return parse_and_validate(BASE + extra.split(), world_size=world_size, rank=0)


def test_megatron_defaults_and_the_two_spellings_of_full_iteration():
    args = _args()
    assert (args.cuda_graph_impl, args.cuda_graph_scope, args.cuda_graph_warmup_steps) == ("none", None, 3)
    assert not full_iteration_graph(args)
    assert full_iteration_graph(_args("--cuda-graph-impl full_iteration --cuda-graph-warmup-steps 1"))
    assert full_iteration_graph(_args("--cuda-graph-impl local --cuda-graph-scope full_iteration"))


@pytest.mark.parametrize("extra, world_size, match", [
    ("--cuda-graph-impl local", 1, "per-layer CUDA graphs"),
    ("--cuda-graph-impl transformer_engine", 1, "per-layer CUDA graphs"),
    ("--cuda-graph-impl local --cuda-graph-scope full_iteration attn", 1, "--cuda-graph-scope"),
    ("--cuda-graph-impl full_iteration --cuda-graph-warmup-steps 0", 1, "at least one eager step"),
    ("--cuda-graph-impl full_iteration --tensor-model-parallel-size 2", 2, "--tensor-model-parallel-size"),
    ("--cuda-graph-impl full_iteration --pipeline-model-parallel-size 2", 2, "--pipeline-model-parallel-size"),
    ("--cuda-graph-impl full_iteration --num-experts 2", 1, "add --moe-grouped-gemm"),
    ("--cuda-graph-impl full_iteration --num-experts 2 --moe-grouped-gemm --moe-expert-capacity-factor 1.0", 1,
     "--moe-pad-expert-input-to-capacity"),
    ("--cuda-graph-impl full_iteration --num-experts 2 --moe-grouped-gemm --moe-router-load-balancing-type sinkhorn",
     1, "sinkhorn"),
    ("--cuda-graph-impl full_iteration --num-experts 2 --moe-grouped-gemm --expert-model-parallel-size 2", 2,
     "--expert-model-parallel-size"),
    ("--cuda-graph-impl full_iteration --recompute-activations", 1, "--recompute-activations"),
    ("--cuda-graph-impl full_iteration --recompute-granularity full --recompute-method uniform --recompute-num-layers 1", 1, "--recompute-granularity"),
])
def test_refusals_name_the_flag(extra, world_size, match):
    with pytest.raises(ValueError, match=match):
        _args(extra, world_size)


def test_a_scope_without_an_implementation_warns(caplog):
    args = _args("--cuda-graph-scope attn mlp")
    assert not full_iteration_graph(args)
    assert "--cuda-graph-scope attn mlp has no effect without --cuda-graph-impl" in caplog.text


def test_moe_whose_dispatch_never_syncs_is_accepted():
    assert full_iteration_graph(_args("--cuda-graph-impl full_iteration --num-experts 4 --moe-grouped-gemm"))
    assert full_iteration_graph(_args("--cuda-graph-impl full_iteration --num-experts 4 --moe-grouped-gemm "
                                      "--moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity"))


def test_fp8_is_accepted():
    # both recipes keep their scaling state on the device (tests/training/test_full_cuda_graph_gpu.py)
    for recipe in ("tensorwise", "delayed"):
        assert full_iteration_graph(_args(f"--cuda-graph-impl full_iteration --fp8-format hybrid "
                                          f"--fp8-recipe {recipe} --bf16"))


def test_data_parallel_is_accepted():
    assert full_iteration_graph(_args("--cuda-graph-impl full_iteration --use-distributed-optimizer", world_size=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_run_ends_with_one_clean_message():
    run = _run(TINY + ["--mock-data", "--train-iters", "1", "--cuda-graph-impl", "full_iteration"])
    _clean_failure(run, "--cuda-graph-impl full_iteration needs a CUDA GPU")


def test_replay_buffers_take_new_values_and_refuse_new_shapes():
    buffers = {"tokens": torch.zeros(2, 4, dtype=torch.long), "mask": torch.zeros(2, 4), "name": "a"}
    _copy_into(buffers, {"tokens": torch.ones(2, 4, dtype=torch.long), "mask": torch.ones(2, 4), "name": "a"}, "0")
    assert buffers["tokens"].sum() == 8 and buffers["mask"].sum() == 8
    with pytest.raises(ValueError, match=r"\[0\]\['tokens'\] is \(2, 5\)"):
        _copy_into(buffers, {"tokens": torch.ones(2, 5, dtype=torch.long), "mask": torch.ones(2, 4), "name": "a"},
                   "[0]")
    with pytest.raises(ValueError, match="torch.int32"):
        _copy_into(buffers, {"tokens": torch.ones(2, 4, dtype=torch.int32), "mask": torch.ones(2, 4), "name": "a"},
                   "0")
    with pytest.raises(ValueError, match="only tensors may change"):
        _copy_into(buffers, {"tokens": torch.ones(2, 4, dtype=torch.long), "mask": torch.ones(2, 4), "name": "b"},
                   "0")
    with pytest.raises(ValueError, match="changed its fields"):
        _copy_into(buffers, {"tokens": torch.ones(2, 4, dtype=torch.long)}, "0")


def test_reports_are_copied_out_and_the_reduction_runs_after_the_step():
    report = torch.tensor([3.0, 4.0])
    copies = _clone_reports([{"lm loss": report}])
    report.add_(1.0)  # the next replay overwrites the graph's own tensor
    assert copies[0]["lm loss"].tolist() == [3.0, 4.0]
    deferred, calls = _DeferredFinalize(), []
    deferred.run(lambda *a: calls.append(a))
    assert calls == []  # the schedule never called it (forward only): nothing to reduce
    deferred(["model"], report)
    assert calls == []  # inside the captured step: only recorded
    deferred.run(lambda *a: calls.append(a))
    assert calls == [(["model"], report)]


@pytest.mark.parametrize("error", [ValueError("micro-batch field 0['tokens'] is (2, 5)"),
                                   CudaGraphCaptureError("could not be captured")])
def test_refusals_during_training_become_user_errors(error):
    def graphed(**kwargs):
        raise error

    with pytest.raises(UserError, match=re.escape(str(error))):
        as_user_errors(graphed)(num_microbatches=1)


def test_other_failures_keep_their_type():
    def graphed(**kwargs):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        as_user_errors(graphed)()
