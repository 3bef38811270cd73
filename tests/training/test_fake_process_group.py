"""--fake-process-group: one process plays one rank of a TP 2 x PP 2 x DP 2 job through
pretrain_gpt.py; it builds exactly that rank's model (the count --dry-run plans for the
rank's stage), trains to the end with the NaN check on, prints the iteration lines, and
refuses checkpoints by name. A plain one-process run is unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.training.arguments import parse_and_validate, parse_args
from megatron.training.dry_run import plan_stages, prepare_args

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "500", "--lr", "1e-3", "--train-iters", "3",
    "--mock-data", "--use-cpu-initialization", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
]
LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]  # DP 2 on 8 ranks
ITERATION = re.compile(r" iteration +(\d+)/ +3 \|.*number of nan iterations: +0 \|")


def _run(argv, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **env_vars)
    return subprocess.run([sys.executable, "pretrain_gpt.py"] + argv, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env=env)


def _planned_params(pp_rank: int) -> int:
    """What --dry-run reports as the parameters per rank of pipeline stage ``pp_rank``."""
    import pretrain_gpt

    args = prepare_args(parse_args(args=TINY + LAYOUT + ["--dry-run", "--dry-run-world-size", "8"]))
    return plan_stages(args, pretrain_gpt.model_provider)[pp_rank].params.total


# rank = tp + 2 dp + 4 pp: rank 5 is tp 1 of the last stage (the loss; its data is read by
# tp rank 0 in the real job), rank 1 is tp 1 of the first stage (the embedding).
@pytest.mark.parametrize("rank, tp, pp", [(5, 1, 1), (1, 1, 0)])
def test_one_rank_of_an_8_rank_job_trains_in_one_process(rank, tp, pp):
    out = _run(TINY + LAYOUT + ["--fake-process-group"], WORLD_SIZE="8", RANK=str(rank))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert [int(i) for i in ITERATION.findall(out.stdout)] == [1, 2, 3], out.stdout[-3000:]
    assert f"--fake-process-group: this process plays rank {rank} of 8 (tp {tp}, cp 0, ep 0, dp 0, pp {pp})" in text
    assert "losses, gradient norms and every value that needs another rank are meaningless" in text
    built = re.search(rf"number of parameters on \(tensor, pipeline\) model parallel rank \({tp}, {pp}\): (\d+)",
                      out.stdout)
    assert built is not None, out.stdout[-3000:]
    assert int(built.group(1)) == _planned_params(pp)
    assert f"{_planned_params(pp):,} on rank {rank} (tp {tp}, pp {pp})" in text  # the start-up summary


def test_save_is_refused_by_name_on_the_rank_played():
    out = _run(TINY + LAYOUT + ["--fake-process-group", "--save", "/nonexistent/ckpt", "--save-interval", "1"],
               WORLD_SIZE="8", RANK="5")
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert "[rank 5] error: --save '/nonexistent/ckpt': cannot be combined with --fake-process-group" in out.stderr
    assert "Fix: drop --save" in out.stderr
    assert not os.path.exists("/nonexistent/ckpt")


@pytest.mark.parametrize("extra, message", [
    (["--load", "ckpt"], r"--load 'ckpt': cannot be combined with --fake-process-group"),
    (["--pretrained-checkpoint", "ckpt"], r"--pretrained-checkpoint 'ckpt': cannot be combined"),
])
def test_loading_is_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_and_validate(TINY + LAYOUT + ["--fake-process-group"] + extra, world_size=8, rank=5)


def test_the_rank_must_belong_to_the_world():
    with pytest.raises(ValueError, match=r"RANK=8 is not a rank of WORLD_SIZE=8"):
        parse_and_validate(TINY + LAYOUT + ["--fake-process-group"], world_size=8, rank=8)


def test_a_plain_one_process_run_is_unchanged_and_lazy_mpu_init_does_not_change_it():
    """Without the flag: no rehearsal line, the same iteration lines; pretrain() completes
    --lazy-mpu-init's deferred initialization itself, so the losses are the same."""
    plain = _run(TINY)
    lazy = _run(TINY + ["--lazy-mpu-init", "True"])
    for out in (plain, lazy):
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        assert "fake-process-group" not in out.stdout + out.stderr
        assert [int(i) for i in ITERATION.findall(out.stdout)] == [1, 2, 3], out.stdout[-3000:]
    losses = [re.findall(r"lm loss: (\S+) \|", out.stdout) for out in (plain, lazy)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
