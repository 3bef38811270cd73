"""--moe-use-upcycling end to end on CPU: a dense run's checkpoint becomes an MoE run's
iteration 1, whose first step computes the dense model's loss on the batch the dense run
would have read next; the flag's misuses are refused by name."""

from __future__ import annotations

import pytest

from megatron.training.arguments import parse_and_validate
from megatron.training.checkpointing import directory as layout
from tests.training.checkpointing.megatron_cases import FIXTURE, FIXTURE_FLAGS, LOGITS_TOL, megatron_logits, needs_fixture
from tests.training.gpt_runs import TINY_GPT, losses, run_gpt, run_gpt_with_params

MOE = ["--num-experts", "4", "--moe-router-topk", "2"]


def test_upcycled_run_starts_from_the_dense_model(tmp_path):
    dense_dir, moe_dir = str(tmp_path / "dense"), str(tmp_path / "moe")
    dense = losses(run_gpt(1, ["--save", dense_dir, "--save-interval", "2"], iters=3))
    # the dense run also saved at its end (iteration 3); upcycle its iteration 2
    log = run_gpt(1, MOE + ["--moe-use-upcycling", "--load", dense_dir, "--ckpt-step", "2", "--save", moe_dir,
                            "--save-interval", "10"], iters=3)
    assert "upcycled the dense checkpoint" in log and "saved as iteration 1" in log
    assert layout.committed_iterations(moe_dir)[0] == 1
    upcycled = losses(log)
    # iteration 2 of the MoE run reads the batch of the dense run's iteration 3, with the
    # dense weights after 2 steps: every expert a copy of the MLP, routing weights summing to 1
    assert len(upcycled) == 2 and upcycled[0] == pytest.approx(dense[2], rel=2e-5)
    # a later run resumes the MoE checkpoint without the flag
    resumed = run_gpt(1, MOE + ["--load", moe_dir, "--save", moe_dir, "--save-interval", "10",
                               "--override-opt-param-scheduler"], iters=4)
    assert len(losses(resumed)) == 1
    # the flag again into a --save that holds the MoE checkpoints: refused
    with pytest.raises(Exception, match="already holds checkpoints"):
        run_gpt(1, MOE + ["--moe-use-upcycling", "--load", dense_dir, "--save", moe_dir, "--save-interval", "10"],
                iters=3)


@pytest.mark.parametrize("extra, match", [
    (["--moe-use-upcycling", "--load", "d", "--save", "s", "--save-interval", "1"], "add --num-experts"),
    (MOE + ["--moe-use-upcycling", "--save", "s", "--save-interval", "1"], "add --load"),
    (MOE + ["--moe-use-upcycling", "--load", "d"], "add --save"),
    (MOE + ["--moe-use-upcycling", "--load", "d", "--save", "s", "--save-interval", "1",
            "--moe-shared-expert-intermediate-size", "64"], "drop --moe-shared-expert-intermediate-size"),
    (MOE + ["--moe-upcycling-granularity", "0"], "--moe-upcycling-granularity 0"),
    (MOE + ["--moe-use-upcycling", "--load", "d", "--save", "s", "--save-interval", "1", "--use-torch-fsdp2",
            "--untie-embeddings-and-output-weights", "--no-gradient-accumulation-fusion", "--ckpt-format", "torch_dcp"],
     "without --use-torch-fsdp2"),
])
def test_misuse_is_refused_by_flag(extra, match):
    with pytest.raises(ValueError, match=match):
        parse_and_validate(TINY_GPT + ["--train-iters", "2"] + extra, world_size=1)


def _moe_fixture_model():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                               hidden_dropout=0.0, attention_dropout=0.0, num_moe_experts=4, moe_router_topk=2)
    return GPTModel(config, vocab_size=512, max_sequence_length=64).eval()


@needs_fixture
def test_upcycling_a_checkpoint_written_by_megatron_lm_keeps_its_logits(tmp_path):
    """Megatron-LM's own dense GPT checkpoint (torch_dist) upcycled into 4 experts top-2:
    the MoE model gives the logits Megatron's dense model gave."""
    import numpy as np
    import torch

    _, params, _ = run_gpt_with_params(1, FIXTURE_FLAGS[len(TINY_GPT):] + MOE + [
        "--moe-use-upcycling", "--load", str(FIXTURE / "torch_dist"), "--save", str(tmp_path / "moe"),
        "--save-interval", "10"], iters=1)
    model = _moe_fixture_model()
    missing, unexpected = model.load_state_dict(params[0], strict=False)
    assert not unexpected and all("_extra_state" in k or "expert_bias" in k for k in missing), missing
    data = np.load(FIXTURE / "logits.npz")
    with torch.no_grad():
        logits = model(torch.from_numpy(data["tokens"]), torch.from_numpy(data["position_ids"]), None)
    torch.testing.assert_close(logits, megatron_logits(), **LOGITS_TOL)
