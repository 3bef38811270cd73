"""Run pretrain_gpt in-process on N gloo ranks and read the losses from its log lines."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import List, Optional

from tests.multirank import run_on_ranks

TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
    "--log-interval", "1", "--eval-iters", "0",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--use-cpu-initialization", "--num-workers", "0",
    "--distributed-backend", "gloo",
]

LOSS = re.compile(r"lm loss: ([0-9.Ee+-]+|nan|inf)")
GRAD_NORM = re.compile(r"grad norm: ([0-9.]+|nan|inf)")


def _break_row_parallel_reduction():
    """Make RowParallelLinear skip its tensor-parallel all-reduce (a planted bug)."""
    from megatron.core.tensor_parallel import layers

    layers.reduce_from_tensor_model_parallel_region = lambda x, group: x


def nan_loss_on_last_rank_at_iteration_3():
    """The last rank's third micro-batch loss becomes NaN (a planted fault)."""
    import pretrain_gpt
    import torch.distributed as dist

    original = pretrain_gpt.loss_func
    calls = {"n": 0}

    def loss_func(loss_mask, output_tensor):
        calls["n"] += 1
        loss, num_tokens, report = original(loss_mask, output_tensor)
        if dist.get_rank() == dist.get_world_size() - 1 and calls["n"] == 3:
            loss = loss * float("nan")
            report = {k: v * float("nan") for k, v in report.items()}
        return loss, num_tokens, report

    pretrain_gpt.loss_func = loss_func


def _scaled_loss_of_iteration_3(factor: float, every_run: bool):
    """One process, 4 micro-batches per iteration: the losses of iteration 3 (calls 9-12) are
    multiplied by ``factor``; only in its first run unless ``every_run`` (a rerun of the
    iteration makes calls 13-16)."""
    import pretrain_gpt

    original = pretrain_gpt.loss_func
    calls = {"n": 0}

    def loss_func(loss_mask, output_tensor):
        calls["n"] += 1
        loss, num_tokens, report = original(loss_mask, output_tensor)
        if 9 <= calls["n"] <= (16 if every_run else 12):
            loss = loss * factor
            # a report is [loss sum, token count]: only the sum is scaled
            report = {k: v * v.new_tensor([factor, 1.0]) for k, v in report.items()}
        return loss, num_tokens, report

    pretrain_gpt.loss_func = loss_func


def _sleep_in_iteration_2():
    """A rank that stops making progress: the first loss of iteration 2 (one process, 4
    micro-batches per iteration) sleeps for a minute."""
    import time

    import pretrain_gpt

    original = pretrain_gpt.loss_func
    calls = {"n": 0}

    def loss_func(loss_mask, output_tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            time.sleep(60)
        return original(loss_mask, output_tensor)

    pretrain_gpt.loss_func = loss_func


def _last_rank_dies_in_iteration_2():
    """Peer death: the last rank's process ends abruptly in the first micro-batch of
    iteration 2 (2 ranks, 2 micro-batches per iteration each)."""
    import os

    import pretrain_gpt
    import torch.distributed as dist

    original = pretrain_gpt.loss_func
    calls = {"n": 0}

    def loss_func(loss_mask, output_tensor):
        calls["n"] += 1
        if calls["n"] == 3 and dist.get_rank() == dist.get_world_size() - 1:
            os._exit(9)
        return original(loss_mask, output_tensor)

    pretrain_gpt.loss_func = loss_func


def fused_adamw_builder(original):
    """``megatron.core.optimizer._torch_optimizer`` that builds torch's fused AdamW on CPU
    too (the GPU default), which can skip a step on a device flag."""
    import torch

    def fused(config, param_groups):
        built = original(config, param_groups)
        if type(built) is torch.optim.AdamW:
            # What AdamW(fused=True) sets (the groups already hold the "fused" key, so
            # rebuilding from them would keep it off).
            built.defaults["fused"] = True
            for group in built.param_groups:
                group["fused"], group["foreach"] = True, False
            built._step_supports_amp_scaling = True
        return built

    return fused


def fused_adamw_on_cpu():
    """Fused AdamW on CPU for this process: the loop then takes its optimizer steps without
    host syncs."""
    from megatron.core import optimizer

    optimizer._torch_optimizer = fused_adamw_builder(optimizer._torch_optimizer)


SETUPS = {"fused_adamw": fused_adamw_on_cpu, "broken_row_parallel": _break_row_parallel_reduction, "nan_loss": nan_loss_on_last_rank_at_iteration_3,
          "nan_once_at_3": lambda: _scaled_loss_of_iteration_3(float("nan"), every_run=False),
          "nan_always_at_3": lambda: _scaled_loss_of_iteration_3(float("nan"), every_run=True),
          "spike_at_3": lambda: _scaled_loss_of_iteration_3(1000.0, every_run=True),
          "sleep_in_iteration_2": _sleep_in_iteration_2, "peer_dies": _last_rank_dies_in_iteration_2}


def _run_pretrain(rank, world_size, argv, setup=None):
    import pretrain_gpt
    from megatron.core.transformer.enums import ModelType
    from megatron.training.training import pretrain

    for name in (setup or "").split("+"):  # several faults/patches: "a+b"
        if name:
            SETUPS[name]()

    sys.argv = ["pretrain_gpt.py"] + list(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                 ModelType.encoder_or_decoder, pretrain_gpt.forward_step)
    return out.getvalue()


def run_gpt(world_size: int, extra: List[str], iters: Optional[int] = 10, setup: str = None) -> str:
    """The log printed by the last rank of a tiny-GPT run; ``setup`` names a fault to plant
    (a key of SETUPS, or several joined by "+") before training starts."""
    if iters is None:  # sample-based: the length comes from --train-samples in ``extra``
        argv = [a if a != "--lr-warmup-iters" else "--lr-warmup-samples" for a in TINY_GPT] + extra
    else:
        argv = TINY_GPT + ["--train-iters", str(iters)] + extra
    logs = run_on_ranks(_run_pretrain, world_size, args=(argv, setup), timeout=400)
    return logs[-1]


def losses(log: str) -> List[float]:
    return [float(x) for x in LOSS.findall(log)]


def grad_norms(log: str) -> List[float]:
    return [float(x) for x in GRAD_NORM.findall(log)]


_CAPTURED = {}


def _capture_model() -> None:
    """Wrap the training driver's model setup so the trained chunks can be read afterwards."""
    from megatron.training import training

    original = training.setup_model_and_optimizer

    def capturing(*args, **kwargs):
        model, optimizer, scheduler = original(*args, **kwargs)
        _CAPTURED["model"], _CAPTURED["optimizer"] = model, optimizer
        return model, optimizer, scheduler

    training.setup_model_and_optimizer = capturing


def _final_params() -> dict:
    """{param name: fp32 copy} of this rank's chunks, after any pending param all-gather."""
    out = {}
    for chunk in _CAPTURED["model"]:
        if hasattr(chunk, "finish_param_sync"):
            chunk.finish_param_sync()
        for name, param in getattr(chunk, "module", chunk).named_parameters():
            if hasattr(param, "full_tensor"):  # FSDP2: gather the dp shards (collective)
                param = param.full_tensor()
            out[name] = param.detach().float().clone()
    return out


def _run_pretrain_with_params(rank, world_size, argv, patch):
    _capture_model()
    if patch is not None:
        patch()
    log = _run_pretrain(rank, world_size, argv)
    return log, _final_params(), type(_CAPTURED["optimizer"]).__name__


def run_gpt_with_params(world_size: int, extra: List[str], iters: int = 10, patch=None):
    """A tiny-GPT run: (log of the last rank, [per rank {param name: final fp32 value}],
    [per rank optimizer class name]).

    ``patch``: a module-level function run on every rank before training (to plant a bug).
    """
    argv = TINY_GPT + ["--train-iters", str(iters)] + extra
    results = run_on_ranks(_run_pretrain_with_params, world_size, args=(argv, patch), timeout=400)
    return results[-1][0], [r[1] for r in results], [r[2] for r in results]
