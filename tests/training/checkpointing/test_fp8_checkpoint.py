"""FP8 scaling state across checkpoints, end to end, in the torch and torch_dist formats
(torch_dcp and Megatron-LM's checkpoints at the end): a checkpoint saved without FP8
starts an FP8 run (weights as saved, scaling state fresh, one log line), an FP8 checkpoint
loads into a model without FP8, an FP8 run resumes bit-exactly, and --fp8-amax-history-len
may change on resume (4 -> 2 -> 4: the saved history resized, the scales as saved). What
is not FP8 state is still refused when missing.

FP8 runs through the fp32 emulation on CPU, one process unless a test says otherwise. Per
format, one chain:

    bf16 run, saved at 4 -> FP8 (history 4) from it, saved at 5 and 6
        -> resumed from 5 with the same flags (bit-exact against the run's iteration 6)
        -> history 2 from 6, saved at 8 -> history 4 from 8
        -> without FP8 from 6
"""

from __future__ import annotations

import contextlib
import io
from typing import Dict

import pytest
import torch

from megatron.core.fp8.scaling import is_fp8_scaling_key
from tests.multirank import RankFailure, run_on_ranks
from tests.training.checkpointing.ckpt_runs import CkptRun, _assemble, _run_pretrain
from tests.training.checkpointing.megatron_cases import FIXTURE, FIXTURE_FLAGS, needs_fixture
from tests.training.gpt_runs import TINY_GPT

# The chained runs train to different --train-iters: a fixed decay horizon, and the
# scheduler's other values (weight-decay increments) from the command line.
BASE = list(TINY_GPT) + ["--lr-decay-iters", "12", "--override-opt-param-scheduler"]
FP8 = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-emulation", "--fp8-amax-compute-algo", "max"]
HISTORY = "decoder.layers.0.mlp.linear_fc1.fp8.amax_history"
SCALE = "decoder.layers.1.self_attention.linear_qkv.fp8.scale"
FRESH_LINE = "8 FP8 linear(s) start with fresh scaling state (amax history 0, scale 1), as at the start of an " \
             "FP8 run: the checkpoint was saved without FP8"


def _run_logging(rank, world_size, argv, snapshot_points):
    """``_run_pretrain`` with the run's log records (stderr) added to its output."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        losses, snapshots, out = _run_pretrain(rank, world_size, argv, snapshot_points)
    return losses, snapshots, out + err.getvalue()


def _run_keeping_fp8_state(rank, world_size, argv):
    """``_run_logging`` that also returns the FP8 scaling buffers right after setup (and
    any --load): the snapshots of ``ckpt_runs`` do not read FSDP2's sharded params."""
    from megatron.training import training

    loaded = {}
    setup = training.setup_model_and_optimizer

    def setup_and_keep(*args, **kwargs):
        model, optimizer, scheduler = setup(*args, **kwargs)
        for chunk in model:
            loaded.update({k: v.detach().clone() for k, v in chunk.module.state_dict().items()
                           if is_fp8_scaling_key(k)})
        return model, optimizer, scheduler

    training.setup_model_and_optimizer = setup_and_keep
    losses, _, log = _run_logging(rank, world_size, argv, ())
    return losses, loaded, log


def _run(extra, iters, snapshots=(), world_size=1) -> CkptRun:
    argv = BASE + ["--train-iters", str(iters)] + list(extra)
    results = run_on_ranks(_run_logging, world_size, args=(argv, tuple(snapshots)), timeout=300)
    # the losses from the last pipeline stage, the log lines from rank 0
    run = CkptRun(losses=results[-1][0], log=results[0][2])
    for point in snapshots:
        run.snapshots[point] = _assemble([r[1][point] for r in results])
    return run


def _model(snapshot: Dict[str, torch.Tensor], fp8: bool) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot.items() if not k.startswith("optimizer.") and is_fp8_scaling_key(k) == fp8}


@pytest.fixture(scope="module", params=["torch", "torch_dist"])
def chain(request, tmp_path_factory):
    fmt = ["--ckpt-format", request.param]
    root = tmp_path_factory.mktemp(request.param)
    bf16_dir, fp8_dir, short_dir = (str(root / n) for n in ("bf16", "fp8", "short"))
    runs = {"bf16": _run(fmt + ["--save", bf16_dir, "--save-interval", "4"], 4, snapshots=(4,))}
    runs["fp8"] = _run(fmt + FP8 + ["--fp8-amax-history-len", "4", "--load", bf16_dir, "--save", fp8_dir,
                                    "--save-interval", "1"], 6, snapshots=("load", 6))
    runs["resumed"] = _run(fmt + FP8 + ["--fp8-amax-history-len", "4", "--load", fp8_dir, "--ckpt-step", "5"], 6)
    runs["short"] = _run(fmt + FP8 + ["--fp8-amax-history-len", "2", "--load", fp8_dir, "--save", short_dir,
                                      "--save-interval", "2"], 8, snapshots=("load", 8))
    runs["long"] = _run(fmt + FP8 + ["--fp8-amax-history-len", "4", "--load", short_dir], 9, snapshots=("load",))
    runs["plain"] = _run(fmt + ["--load", fp8_dir], 7, snapshots=("load",))
    runs["bf16_dir"], runs["format"] = bf16_dir, fmt
    return runs


def test_a_checkpoint_without_fp8_starts_an_fp8_run(chain):
    bf16, fp8 = chain["bf16"], chain["fp8"]
    loaded, saved = fp8.snapshots["load"], bf16.snapshots[4]
    assert not _model(saved, fp8=True)
    # every weight (and the optimizer state) as saved ...
    assert {k: v for k, v in loaded.items() if not is_fp8_scaling_key(k)}.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    # ... and the scaling state as a new FP8 model has it
    fp8_state = _model(loaded, fp8=True)
    assert len(fp8_state) == 16
    for key, value in fp8_state.items():
        assert torch.equal(value, torch.zeros(4, 3) if key.endswith("amax_history") else torch.ones(3)), key
    assert sorted(fp8.losses) == [5, 6]
    assert all(abs(v) < 10 for v in fp8.loss_floats().values())
    assert fp8.log.count(FRESH_LINE) == 1, fp8.log[-3000:]
    assert fp8.snapshots[6][HISTORY].abs().sum() > 0  # and FP8 training ran from there


def test_an_fp8_run_resumes_bit_exactly(chain):
    fp8, resumed = chain["fp8"], chain["resumed"]
    assert resumed.losses == {6: fp8.losses[6]}
    assert "fresh scaling state" not in resumed.log and "amax histories saved" not in resumed.log


def test_a_shorter_amax_history_keeps_the_most_recent_amaxes(chain):
    saved, loaded = chain["fp8"].snapshots[6], chain["short"].snapshots["load"]
    for key in _model(saved, fp8=True):
        if key.endswith("amax_history"):
            assert saved[key].shape == (4, 3) and loaded[key].shape == (2, 3)
            # row 0 is cleared between calls; row 1 holds the newest amax
            assert torch.equal(loaded[key], saved[key][:2]), key
            assert not saved[key][0].any() and saved[key][1].all()
        else:
            assert torch.equal(loaded[key], saved[key]), key
    for key in _model(saved, fp8=False):
        assert torch.equal(loaded[key], saved[key]), key
    assert "FP8 amax histories saved with 4 rows load into --fp8-amax-history-len 2" in chain["short"].log
    assert sorted(chain["short"].losses) == [7, 8]


def test_a_longer_amax_history_is_padded_with_zeros(chain):
    saved, loaded = chain["short"].snapshots[8], chain["long"].snapshots["load"]
    assert torch.equal(loaded[HISTORY], torch.cat([saved[HISTORY], torch.zeros(2, 3)]))
    assert torch.equal(loaded[SCALE], saved[SCALE])
    assert "saved with 2 rows load into --fp8-amax-history-len 4: the most recent amaxes are kept, the rest is " \
           "zeros" in chain["long"].log
    assert sorted(chain["long"].losses) == [9]


def test_an_fp8_checkpoint_loads_into_a_model_without_fp8(chain):
    saved, loaded = chain["fp8"].snapshots[6], chain["plain"].snapshots["load"]
    assert not _model(loaded, fp8=True)
    assert {k: v for k, v in saved.items() if not is_fp8_scaling_key(k)}.keys() == loaded.keys()
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    assert "the checkpoint's FP8 scaling state of 8 linear(s) is not used" in chain["plain"].log
    assert sorted(chain["plain"].losses) == [7]


def test_two_ranks_count_each_linear_once(chain):
    """Loaded by two ranks (torch: data-parallel replicas reading the same file; torch_dist:
    two pipeline stages holding one layer each), the line counts each FP8 linear once, on
    rank 0 only, and the weights are the saved ones."""
    layout = ["--pipeline-model-parallel-size", "2"] if chain["format"][1] == "torch_dist" else []
    run = _run(chain["format"] + FP8 + layout + ["--load", chain["bf16_dir"]], 5, snapshots=("load",), world_size=2)
    assert run.log.count(FRESH_LINE) == 1, run.log[-3000:]
    saved = chain["bf16"].snapshots[4]
    for key, value in _model(saved, fp8=False).items():
        assert torch.equal(run.snapshots["load"][key], value), key
    assert sorted(run.losses) == [5]


def test_other_missing_keys_are_still_refused(chain):
    """A model with q/k layer norms wants keys the bf16 checkpoint lacks besides the FP8
    state: the load fails naming them, and only them."""
    with pytest.raises(RankFailure) as failure:
        _run(chain["format"] + FP8 + ["--qk-layernorm", "--load", chain["bf16_dir"]], 5)
    message = str(failure.value)
    assert "does not fit this model; nothing was loaded" in message
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in message
    assert "fp8" not in message.split("nothing was loaded", 1)[1].split("Traceback")[0]


def test_torch_dcp_starts_fp8_from_bf16_and_changes_the_history_length(tmp_path):
    """--use-torch-fsdp2 (one rank): bf16 saved at 4 -> FP8 with history 4 from it, saved
    at 6 -> history 2 from 6."""
    fsdp2 = BASE + ["--untie-embeddings-and-output-weights", "--use-torch-fsdp2", "--ckpt-format", "torch_dcp"]
    bf16_dir, fp8_dir = str(tmp_path / "bf16"), str(tmp_path / "fp8")

    def run(extra, iters):
        return run_on_ranks(_run_keeping_fp8_state, 1, args=(fsdp2 + ["--train-iters", str(iters)] + extra,),
                            timeout=300)[0]

    run(["--save", bf16_dir, "--save-interval", "4"], 4)
    losses, loaded, log = run(FP8 + ["--fp8-amax-history-len", "4", "--load", bf16_dir, "--save", fp8_dir,
                                     "--save-interval", "2"], 6)
    assert log.count(FRESH_LINE) == 1, log[-3000:]
    assert len(loaded) == 16 and all(torch.equal(v, torch.zeros(4, 3)) for k, v in loaded.items()
                                     if k.endswith("amax_history"))
    assert sorted(losses) == [5, 6] and all(abs(float.fromhex(v)) < 10 for v in losses.values())
    losses, loaded, log = run(FP8 + ["--fp8-amax-history-len", "2", "--load", fp8_dir], 7)
    assert "saved with 4 rows load into --fp8-amax-history-len 2" in log, log[-3000:]
    assert loaded[HISTORY].shape == (2, 3) and not loaded[HISTORY][0].any() and loaded[HISTORY][1].all()
    assert sorted(losses) == [7]


@needs_fixture
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_a_megatron_lm_checkpoint_starts_an_fp8_run(fmt):
    """Checkpoints written by Megatron-LM (without FP8) fine-tune in FP8 here too."""
    argv = FIXTURE_FLAGS + FP8 + ["--load", str(FIXTURE / fmt), "--finetune", "--train-iters", "2"]
    losses, loaded, log = run_on_ranks(_run_keeping_fp8_state, 1, args=(argv,), timeout=300)[0]
    assert log.count(FRESH_LINE) == 1, log[-3000:]
    assert len(loaded) == 16 and all(torch.equal(v, torch.ones(3)) for k, v in loaded.items() if k.endswith("scale"))
    assert sorted(losses) == [1, 2] and all(abs(float.fromhex(v)) < 10 for v in losses.values())
