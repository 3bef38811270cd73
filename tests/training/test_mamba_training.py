"""A tiny hybrid model trains end to end through pretrain_hybrid.py (CPU, gloo): the loss
falls, the log line carries the hybrid FLOP count, and a checkpoint resumes bit-exactly."""

import re

import pytest

from tests.training.gpt_runs import losses
from tests.training.mamba_runs import run_hybrid


@pytest.fixture(scope="module")
def reference_log():
    return run_hybrid(1, ["--log-throughput"], iters=8)


def test_tiny_hybrid_trains_and_loss_falls(reference_log):
    values = losses(reference_log)
    assert len(values) == 8
    # Random tokens of a 512-word vocabulary start at ln(512) ~ 6.24; Adam at lr 1e-3
    # on repeated mock samples brings it down by far more than noise within 8 steps.
    assert values[-1] < values[0] - 0.2, values
    assert "throughput per GPU (TFLOP/s/GPU)" in reference_log
    assert "M-*M" in reference_log


def test_resume_is_bit_exact(reference_log, tmp_path):
    save = str(tmp_path / "ckpt")
    first = run_hybrid(1, ["--save", save, "--save-interval", "4", "--exit-interval", "4"], iters=8)
    resumed = run_hybrid(1, ["--load", save, "--save", save, "--save-interval", "100"], iters=8)
    expected = re.findall(r"lm loss: ([0-9.E+-]+)", reference_log)
    assert re.findall(r"lm loss: ([0-9.E+-]+)", first) == expected[:4]
    assert re.findall(r"lm loss: ([0-9.E+-]+)", resumed) == expected[4:]


def test_selective_recompute_gives_the_same_losses(reference_log):
    """--recompute-granularity selective recomputes the attention layers' core attention
    (the Mamba and MLP layers keep their activations): the same kernels run again, so the
    losses are those of the run without recompute, bit for bit."""
    log = run_hybrid(1, ["--log-throughput", "--recompute-granularity", "selective"], iters=8)
    assert losses(log) == losses(reference_log)


def test_selective_recompute_reaches_the_attention_layers():
    from megatron.core.models.mamba import MambaModel
    from megatron.core.ssm.mamba_config import MambaConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                               use_cpu_initialization=True, recompute_granularity="selective")
    mamba = MambaConfig(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2, mamba_num_heads=8, chunk_size=4)
    model = MambaModel(config, mamba, "M*-", vocab_size=64, max_sequence_length=16)
    attention = [m for m in model.modules() if hasattr(m, "checkpoint_core_attention")]
    assert attention and all(m.checkpoint_core_attention for m in attention)


def _close(a, b, rtol=2e-5):
    assert len(a) == len(b) == 8, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"iteration {i + 1}: {x} vs {y} (rtol {rtol})"


@pytest.mark.parametrize("world, extra", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "M-|*M"]),
    # four stages of one layer: rank 0 holds chunks M and *, rank 1 holds - and M
    (2, ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
         "--hybrid-layer-pattern", "M|-|*|M"]),
    (2, ["--use-distributed-optimizer"]),
    # each CP rank scans 4 of the 8 heads and 1 of the 2 groups over the whole sequence
    (2, ["--context-parallel-size", "2"]),
    # one group per TP rank, shared by both CP ranks
    (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "M-|*M"]),
], ids=["tp2-sp", "pp2-cut", "pp2-vpp2", "dp2-distopt", "cp2", "cp2xtp2-sp", "cp2xpp2-cut"])
def test_parallel_layout_matches_single_process(reference_log, world, extra):
    """Each layout gives the single-process losses.

    Tolerance as in test_gpt_parity: every layout starts from the same weights
    (--use-cpu-initialization; the mixer draws its full weights, then slices heads and
    groups), and only the order of float32 sums differs (TP partial sums, DP gradient
    averaging, CP ranks' gradient slices added), ~1e-7 relative per step, carried by Adam
    over 8 steps; 2e-5 is far above that and far below a real error (a mixer that splits
    its in-projection rows as one block instead of per part mixes z, x, B, C and dt
    between ranks and breaks the loss at step 1)."""
    log = run_hybrid(world, ["--log-throughput"] + extra, iters=8)
    _close(losses(log), losses(reference_log))


FP8 = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-emulation", "--fp8-amax-history-len", "4"]


def test_fp8_reaches_every_linear_of_the_hybrid_layers():
    """--fp8-format puts the Mamba layers' in- and out-projections in FP8 beside the attention
    and MLP layers' linears (Megatron's hybrid stack builds each layer in its FP8 context);
    --first-last-layers-bf16 keeps the first and last layer out."""
    from megatron.core.models.mamba import MambaModel
    from megatron.core.ssm.mamba_config import MambaConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    def fp8_linears(**kw):
        config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                                   use_cpu_initialization=True, fp8="hybrid", fp8_emulation=True, **kw)
        mamba = MambaConfig(mamba_state_dim=8, mamba_head_dim=8, mamba_num_groups=2, mamba_num_heads=8, chunk_size=4)
        model = MambaModel(config, mamba, "M*-M", vocab_size=64, max_sequence_length=16)
        return sorted(n[: -len(".fp8")] for n, _ in model.named_modules() if n.endswith(".fp8"))

    assert fp8_linears() == [
        "decoder.layers.0.mixer.in_proj", "decoder.layers.0.mixer.out_proj",
        "decoder.layers.1.self_attention.linear_proj", "decoder.layers.1.self_attention.linear_qkv",
        "decoder.layers.2.mlp.linear_fc1", "decoder.layers.2.mlp.linear_fc2",
        "decoder.layers.3.mixer.in_proj", "decoder.layers.3.mixer.out_proj"]
    assert fp8_linears(first_last_layers_bf16=True) == [
        "decoder.layers.1.self_attention.linear_proj", "decoder.layers.1.self_attention.linear_qkv",
        "decoder.layers.2.mlp.linear_fc1", "decoder.layers.2.mlp.linear_fc2"]


def test_fp8_hybrid_trains_close_to_fp32_and_recomputes_exactly(reference_log):
    """In the FP8 emulation the tiny hybrid's losses stay within 2% of the fp32 run's at every
    step (as the FP8 GPT's do); with full recompute, delayed scaling replays the forward's
    scales, so the losses are those without recompute, bit for bit."""
    fp8 = losses(run_hybrid(1, ["--log-throughput"] + FP8, iters=8))
    for i, (x, y) in enumerate(zip(fp8, losses(reference_log))):
        assert abs(x - y) <= 0.02 * abs(y), f"iteration {i + 1}: {x} vs fp32 {y}"
    assert fp8 != losses(reference_log)  # the linears did run in FP8
    recomputed = run_hybrid(1, ["--log-throughput", "--recompute-granularity", "full", "--recompute-method",
                                "uniform", "--recompute-num-layers", "1"] + FP8, iters=8)
    assert losses(recomputed) == fp8


def test_fp8_parameter_all_gather_reaches_the_mixer_weights():
    """--fp8-param-gather (distributed optimizer, two ranks) gathers every FP8 linear's weight
    in FP8, the mixer's fused in-projection included; with fp32 parameters and tensorwise
    scaling the gathered bytes are the ones each step would quantize, so the losses equal the
    run without the flag, bit for bit."""
    flags = ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-emulation", "--use-distributed-optimizer"]
    log = run_hybrid(2, flags + ["--fp8-param-gather"], iters=4, log_records=True)
    # the mixers' in_proj and out_proj, the attention and MLP linears: 8 weights in FP8 buffers
    assert re.search(r"DDP grad buffer: 8 dense FP8-gathered params", log), log
    assert losses(log) == losses(run_hybrid(2, flags, iters=4))
