"""--use-megatron-fsdp on gloo: each --data-parallel-sharding-strategy trains exactly as the
implementation it maps to (the same code runs, so the losses are bit-equal: any other flag
reaching the model, optimizer or gradient reduction would move them); --ckpt-format
fsdp_dtensor is a plain DCP directory that resumes bit-exactly and loads resharded to one
data-parallel rank; Megatron-FSDP's rules are refused with the flag and the fix.

Reshard tolerance: one rank sums the gradients in another order than two, moving the last
bits of the loss; the bound is test_fsdp2.py's (2e-5 relative, measured ~1e-7), while a
wrong or missing shard moves the loss by far more.
"""

from __future__ import annotations

import os

import pytest

from tests.training.checkpointing.ckpt_runs import run_ckpt

RTOL = 2e-5
TOTAL, SAVED_AT = 5, 3
UNTIED = ["--untie-embeddings-and-output-weights"]
# Megatron-FSDP's required flags (its user guide): the distributed optimizer and the
# overlap flags come along and must not change what runs.
MFSDP = ["--use-megatron-fsdp", "--ckpt-format", "fsdp_dtensor", "--use-distributed-optimizer",
         "--no-gradient-accumulation-fusion"]


def _strategy(name):
    return MFSDP + ["--data-parallel-sharding-strategy", name]


def _iter_dir(root):
    return os.path.join(root, f"iter_{SAVED_AT:07d}")


def _close(got, ref):
    assert sorted(got) == sorted(ref) and got, (got, ref)
    for it in sorted(ref):
        assert abs(got[it] - ref[it]) <= RTOL * abs(ref[it]), f"loss {it}: {got[it]} vs {ref[it]} (rtol {RTOL})"


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mfsdp_fsdp2"))
    reference = run_ckpt(2, UNTIED + ["--use-torch-fsdp2"], TOTAL)
    run = run_ckpt(2, UNTIED + _strategy("optim_grads_params") + ["--save", root, "--save-interval", str(SAVED_AT)],
                   TOTAL)
    return reference, run, root


@pytest.fixture(scope="module")
def distopt_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mfsdp_distopt"))
    reference = run_ckpt(2, ["--use-distributed-optimizer"], TOTAL)
    run = run_ckpt(2, _strategy("optim_grads") + ["--save", root, "--save-interval", str(SAVED_AT)], TOTAL)
    return reference, run, root


def test_optim_grads_params_is_fsdp2(fsdp2_runs):
    reference, run, root = fsdp2_runs
    assert sorted(run.losses) == list(range(1, TOTAL + 1))
    assert run.losses == reference.losses
    saved = set(os.listdir(_iter_dir(root)))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt"} <= saved, saved
    assert "metadata.json" not in saved
    from megatron.training.checkpointing.checkpoint_args import read_saved_args

    saved_args = read_saved_args(_iter_dir(root))
    assert saved_args.use_torch_fsdp2 and saved_args.ckpt_format == "fsdp_dtensor"


def test_fsdp_dtensor_of_fsdp2_resumes_bit_exactly(fsdp2_runs):
    _, run, root = fsdp2_runs
    resumed = run_ckpt(2, UNTIED + _strategy("optim_grads_params") + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    assert resumed.losses == {it: h for it, h in run.losses.items() if it > SAVED_AT}, resumed.log[-3000:]


def test_fsdp_dtensor_of_fsdp2_loads_resharded_to_one_rank(fsdp2_runs):
    _, run, root = fsdp2_runs
    resumed = run_ckpt(1, UNTIED + _strategy("optim_grads_params") + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    _close(resumed.loss_floats(), {it: v for it, v in run.loss_floats().items() if it > SAVED_AT})


def test_optim_grads_is_the_distributed_optimizer(distopt_runs):
    reference, run, root = distopt_runs
    assert sorted(run.losses) == list(range(1, TOTAL + 1))
    assert run.losses == reference.losses
    saved = set(os.listdir(_iter_dir(root)))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= saved, saved
    assert not {"metadata.json", "common.pt"} & saved, saved  # torch_dist's keys, no marker
    from megatron.training.checkpointing.fsdp_dtensor_format import holds_torch_dist_layout
    from megatron.training.checkpointing.torch_dcp_format import is_torch_dcp_checkpoint

    assert holds_torch_dist_layout(_iter_dir(root)) and not is_torch_dcp_checkpoint(_iter_dir(root))


def test_fsdp_dtensor_of_the_distributed_optimizer_resumes_bit_exactly(distopt_runs):
    _, run, root = distopt_runs
    resumed = run_ckpt(2, _strategy("optim_grads") + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    assert resumed.losses == {it: h for it, h in run.losses.items() if it > SAVED_AT}, resumed.log[-3000:]


def test_fsdp_dtensor_of_the_distributed_optimizer_loads_resharded_to_one_rank(distopt_runs):
    _, run, root = distopt_runs
    resumed = run_ckpt(1, _strategy("optim") + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    _close(resumed.loss_floats(), {it: v for it, v in run.loss_floats().items() if it > SAVED_AT})


def test_optim_is_the_distributed_optimizer(distopt_runs):
    reference = distopt_runs[0]
    assert run_ckpt(2, _strategy("optim"), TOTAL).losses == reference.losses


def test_no_shard_is_plain_data_parallelism():
    reference = run_ckpt(2, ["--overlap-grad-reduce"], TOTAL)
    run = run_ckpt(2, _strategy("no_shard") + ["--overlap-grad-reduce", "--overlap-param-gather"], TOTAL)
    assert sorted(run.losses) == list(range(1, TOTAL + 1))
    assert run.losses == reference.losses


def test_an_fsdp2_checkpoint_is_refused_by_the_distributed_optimizer(fsdp2_runs):
    """The two kinds of fsdp_dtensor do not cross: the refusal names FSDP2 and the converter."""
    root = fsdp2_runs[2]
    with pytest.raises(Exception) as error:
        run_ckpt(1, UNTIED + _strategy("optim") + ["--load", root, "--ckpt-step", str(SAVED_AT)], TOTAL)
    assert "does not use FSDP2" in str(error.value), str(error.value)[-2000:]


ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "3"]


def _validate(extra, world=2):
    from megatron.training.arguments import parse_and_validate

    return parse_and_validate(ARGS + extra, world_size=world, rank=0)


@pytest.mark.parametrize("strategy, fsdp2, distopt", [
    ("optim_grads_params", True, False), ("optim_grads", False, True), ("optim", False, True),
    ("no_shard", False, False),
])
def test_each_strategy_sets_the_implementation_and_logs_it(strategy, fsdp2, distopt, caplog):
    with caplog.at_level("INFO", logger="megatron.training.arguments"):
        args = _validate(UNTIED + _strategy(strategy) + ["--overlap-grad-reduce", "--overlap-param-gather"])
    assert (args.use_torch_fsdp2, args.use_distributed_optimizer) == (fsdp2, distopt)
    assert args.overlap_param_gather == distopt  # no separate param gather under FSDP2 or DDP
    lines = [r.getMessage() for r in caplog.records if "--use-megatron-fsdp" in r.getMessage()]
    assert len(lines) == 1 and f"--data-parallel-sharding-strategy {strategy} runs as" in lines[0], lines


def test_the_old_name_and_the_default_strategy():
    args = _validate(UNTIED + ["--use-custom-fsdp", "--ckpt-format", "fsdp_dtensor"])
    assert args.use_megatron_fsdp and args.use_torch_fsdp2  # optim_grads_params by default, as in Megatron-LM


@pytest.mark.parametrize("extra, world, names", [
    (["--use-megatron-fsdp"], 2, "add --ckpt-format fsdp_dtensor"),
    (["--ckpt-format", "fsdp_dtensor"], 2, "add --use-megatron-fsdp"),
    (_strategy("optim") + ["--optimizer", "lion"], 2, "--optimizer adam or --optimizer sgd"),
    (_strategy("optim") + ["--use-torch-fsdp2"], 2, "drop one of them"),
    (_strategy("optim") + ["--outer-dp-sharding-strategy", "optim"], 4, "--outer-dp-sharding-strategy no_shard"),
    (UNTIED + _strategy("optim_grads_params") + ["--num-distributed-optimizer-instances", "2"], 4,
     "drop --num-distributed-optimizer-instances"),
    (_strategy("no_shard") + ["--num-distributed-optimizer-instances", "2"], 4,
     "drop --num-distributed-optimizer-instances"),
    (_strategy("optim_grads_params"), 2, "--untie-embeddings-and-output-weights, or use "
                                         "--data-parallel-sharding-strategy optim_grads"),
    (UNTIED + _strategy("optim_grads_params") + ["--pipeline-model-parallel-size", "2"], 4,
     "--pipeline-model-parallel-size 1"),
    (_strategy("optim") + ["--init-model-with-meta-device"], 2, "drop --init-model-with-meta-device"),
    (_strategy("optim") + ["--megatron-fsdp-grad-comm-dtype", "bf16"], 2, "--grad-reduce-in-bf16"),
    (_strategy("optim") + ["--megatron-fsdp-main-params-dtype", "bf16"], 2, "--main-params-dtype"),
])
def test_refusals_name_the_fix(extra, world, names):
    with pytest.raises(ValueError) as error:
        _validate(extra, world)
    assert names in str(error.value), str(error.value)


def test_hybrid_sharding_runs_as_distributed_optimizer_instances():
    args = _validate(_strategy("optim_grads") + ["--num-distributed-optimizer-instances", "2"], world=4)
    assert args.use_distributed_optimizer and args.num_distributed_optimizer_instances == 2


def test_strategy_flags_without_megatron_fsdp_are_reported(caplog):
    with caplog.at_level("WARNING", logger="megatron.training.arguments"):
        args = _validate(["--data-parallel-sharding-strategy", "optim"])
    assert not args.use_distributed_optimizer and not args.use_torch_fsdp2
    assert any("no effect without --use-megatron-fsdp" in r.getMessage() for r in caplog.records)


def test_cuda_device_max_connections_1_is_named_in_the_start_up_line(monkeypatch):
    """Megatron-FSDP asks for it unset: FSDP2's communication cannot overlap compute with one
    hardware queue. Results do not depend on it, so it is a warning in the line, not an error."""
    from megatron.training.megatron_fsdp import resolve_megatron_fsdp

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    args = _validate(UNTIED + _strategy("optim_grads_params"))
    args.use_torch_fsdp2 = False  # resolve again, as validation does first
    assert "unset it" in resolve_megatron_fsdp(args, 2)
