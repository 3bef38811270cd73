"""--cuda-graph-impl full_iteration on one GPU: training steps replayed from a CUDA graph
give the losses and gradient norms of eager steps, digit for digit (with dropout, several
micro-batches, GPT and BERT); the RNG tracker's streams draw in a graph what they draw
eagerly. GPU only."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from tests.training.bert_runs import write_vocab

ROOT = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"(lm loss: \S+|sop loss: \S+|load_balancing_loss: \S+|grad norm: \S+)")
COMMON = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "6", "--train-iters", "8",
    "--lr", "1e-3", "--lr-warmup-iters", "2", "--mock-data", "--bf16",
    "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
    "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--deterministic-mode",
]


def _train(script: str, argv):
    values, output = _train_lines(script, argv)
    assert len(values) >= 16, output[-3000:]
    return values


@pytest.mark.gpu
@pytest.mark.parametrize("warmup", ["1", "3"])
def test_gpt_steps_from_the_graph_equal_eager_steps(warmup):
    argv = COMMON + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
    eager = _train("pretrain_gpt.py", argv)
    graphed = _train("pretrain_gpt.py", argv + ["--cuda-graph-impl", "full_iteration",
                                                "--cuda-graph-warmup-steps", warmup])
    assert graphed == eager


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_steps_from_the_graph_equal_eager_steps(recipe):
    """The scales advance on the device and the FP8 weights are quantized inside the graph
    on every replay: graphed FP8 steps print what eager FP8 steps print."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9 or newer")
    argv = COMMON + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--fp8-format", "hybrid",
                     "--fp8-recipe", recipe]
    eager = _train("pretrain_gpt.py", argv)
    graphed = _train("pretrain_gpt.py", argv + ["--cuda-graph-impl", "full_iteration", "--cuda-graph-warmup-steps", "2"])
    assert graphed == eager


@pytest.mark.gpu
def test_moe_steps_from_the_graph_equal_eager_steps():
    """Grouped GEMMs with dropless routing dispatch without host syncs; the balancing loss
    recorded inside the graph reaches the log line as eagerly."""
    argv = COMMON + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--num-experts", "4",
                     "--moe-router-topk", "2", "--moe-grouped-gemm", "--moe-aux-loss-coeff", "1e-2"]
    eager = _train("pretrain_gpt.py", argv)
    graphed = _train("pretrain_gpt.py", argv + ["--cuda-graph-impl", "full_iteration", "--cuda-graph-warmup-steps", "2"])
    assert any(v.startswith("load_balancing_loss") for v in eager)
    assert graphed == eager


@pytest.mark.gpu
def test_bert_steps_from_the_graph_equal_eager_steps(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt")
    argv = COMMON + ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab,
                     "--make-vocab-size-divisible-by", "64"]
    eager = _train("pretrain_bert.py", argv)
    graphed = _train("pretrain_bert.py", argv + ["--cuda-graph-impl", "local", "--cuda-graph-scope", "full_iteration"])
    assert graphed == eager


@pytest.mark.gpu
def test_graphed_steps_on_the_device_equal_eager_host_steps():
    """The NaN check off: the optimizer steps without host syncs and the loop reads each step
    back an iteration later (lines every 3 iterations); the printed values equal eager
    steps with the NaN check on (host reads every step)."""
    argv = COMMON + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--log-interval", "3"]
    eager = _train_lines("pretrain_gpt.py", argv)
    graphed = _train_lines("pretrain_gpt.py", argv + ["--cuda-graph-impl", "full_iteration",
                                                      "--no-check-for-nan-in-loss-and-grad"])
    assert "the optimizer steps without host syncs" in graphed[1] and "without host syncs" not in eager[1]
    assert graphed[0] == eager[0] and len(eager[0]) == 6  # lines of iterations 1, 3 and 6


def _train_lines(script: str, argv):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(ROOT / script)] + argv, capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return STEP_LINE.findall(run.stdout + run.stderr), run.stdout + run.stderr


@pytest.mark.gpu
def test_tracker_streams_draw_in_a_graph_what_they_draw_eagerly():
    model_parallel_cuda_manual_seed(1234)
    tracker = get_cuda_rng_tracker()
    x = torch.ones(4096, device="cuda")
    tracker_states, default_state = tracker.get_states(), torch.cuda.get_rng_state()

    def step():
        with tracker.fork():
            forked = F.dropout(x, 0.5)
        return forked, F.dropout(x, 0.5)

    eager = [step() for _ in range(3)]
    assert not torch.equal(eager[0][0], eager[0][1]) and not torch.equal(eager[0][0], eager[1][0])
    tracker.set_states(tracker_states)
    torch.cuda.set_rng_state(default_state)
    graph = torch.cuda.CUDAGraph()
    for generator in tracker.graph_generators():
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        forked, plain = step()
    for expected_forked, expected_plain in eager:
        graph.replay()
        assert torch.equal(forked, expected_forked) and torch.equal(plain, expected_plain)
    assert torch.equal(tracker.get_states()["model-parallel-rng"], _states_after(1234, 3))


def _states_after(seed, steps):
    """The model-parallel stream's state after ``steps`` eager draws, from a fresh seeding."""
    model_parallel_cuda_manual_seed(seed)
    tracker = get_cuda_rng_tracker()
    x = torch.ones(4096, device="cuda")
    for _ in range(steps):
        with tracker.fork():
            F.dropout(x, 0.5)
    return tracker.get_states()["model-parallel-rng"]
