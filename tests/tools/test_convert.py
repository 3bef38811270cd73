"""tools/checkpoint/convert.py: Hugging Face import/export and TP resharding."""

from __future__ import annotations

import glob
import os
import sys

import pytest
import torch

from tests.tools.conftest import repo_root

sys.path.insert(0, os.path.join(repo_root(), "tools", "checkpoint"))

import convert  # noqa: E402
from workers import ConversionError  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _convert(*argv: str) -> str:
    return convert.main(["--model-type", "GPT", *argv])


MOE_CASES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _save_hf(name: str, directory) -> object:
    from tests.core.models.hf_cases import hf_model
    from tests.core.models.test_moe_hf_parity import _hf_model as hf_moe_model

    if name == "deepseek_v3":
        from tests.core.models.test_deepseek_hf_parity import YARN, _hf_model as hf_deepseek_model

        model = hf_deepseek_model(12, rope=YARN)
    else:
        model = hf_moe_model(name) if name in MOE_CASES else hf_model(name)
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2", *MOE_CASES, "deepseek_v3"])
def test_hf_import_export_round_trip_is_exact(tmp_path, name):
    """HF files -> ours -> HF files: the same tensors under the same names (MoE experts in
    the per-expert layout HF's own save writes), and transformers loads the result into a
    model with the original's logits."""
    from safetensors.torch import load_file
    from tests.core.models.hf_cases import tokens

    original = _save_hf(name, tmp_path / "hf")
    _convert("--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "core"))
    assert open(tmp_path / "core" / "latest_checkpointed_iteration.txt").read().strip() == "0"
    _convert("--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "core"),
             "--save-dir", str(tmp_path / "out"))
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert reloaded.config.model_type == name
    with torch.no_grad():
        torch.testing.assert_close(reloaded.float().eval()(tokens()).logits, original(tokens()).logits,
                                   rtol=0, atol=0)


def test_imported_checkpoint_gives_transformers_logits(tmp_path):
    from core_checkpoint import open_core_checkpoint, worker_args
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.hf_mapping import gpt_kwargs_from_hf_config
    from megatron.core.transformer.transformer_config import TransformerConfig
    from tests.core.models.hf_cases import tokens
    from workers import export_state_dict, run_workers

    hf = _save_hf("llama", tmp_path / "hf")
    _convert("--loader", "hf", "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "core"),
             "--saver-ckpt-format", "torch")
    checkpoint = open_core_checkpoint(str(tmp_path / "core"))
    args = worker_args(checkpoint.args, load=checkpoint.root, save=None, ckpt_format="torch", tp=1, pp=1, ep=1)
    out = str(tmp_path / "state.pt")
    run_workers(export_state_dict, 1, args, {"model_provider": "pretrain_gpt:model_provider", "output": out})
    _, config_kwargs, model_kwargs = gpt_kwargs_from_hf_config(hf.config.to_dict())
    model = GPTModel(TransformerConfig(use_cpu_initialization=True, **config_kwargs), **model_kwargs).eval()
    model.load_state_dict(torch.load(out)["model"], strict=True)
    ids = tokens()
    positions = torch.arange(ids.size(1)).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        ours = model(ids, positions, None)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _model_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_reshard_torch_format_tp1_to_tp2_and_back(tmp_path):
    from tests.training.gpt_runs import losses, run_gpt

    src, tp2, back = (str(tmp_path / n) for n in ("src", "tp2", "back"))
    run_gpt(1, ["--save", src, "--save-interval", "3", "--ckpt-format", "torch"], iters=3)
    _convert("--load-dir", src, "--save-dir", tp2, "--target-tensor-parallel-size", "2",
             "--saver-ckpt-format", "torch")
    files = sorted(glob.glob(os.path.join(tp2, "iter_0000003", "mp_rank_*", "model_optim_rng.pt")))
    assert [os.path.basename(os.path.dirname(f)) for f in files] == ["mp_rank_00", "mp_rank_01"]
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    assert saved["iteration"] == 3 and "optimizer" not in saved and "rng_state" not in saved

    # torch format TP=2 -> TP=1 (through a torch_dist copy in its own layout): the weights come back exactly.
    _convert("--loader", "mcore", "--saver", "megatron", "--load-dir", tp2, "--save-dir", back,
             "--target-tensor-parallel-size", "1", "--saver-ckpt-format", "torch")
    original = _model_state(os.path.join(src, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"))
    returned = _model_state(os.path.join(back, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"))
    assert sorted(original) == sorted(returned)
    for key, value in original.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, returned[key]), key

    # The TP=2 files load into a 2-rank run whose first loss is the source's.
    resume = ["--no-load-optim", "--no-load-rng", "--ckpt-format", "torch"]
    tp1_loss = losses(run_gpt(1, ["--load", src] + resume, iters=4))[0]
    tp2_loss = losses(run_gpt(2, ["--load", tp2, "--tensor-model-parallel-size", "2"] + resume, iters=4))[0]
    assert abs(tp1_loss - tp2_loss) < 1e-4 * max(1.0, abs(tp1_loss))


@pytest.mark.parametrize(
    "target, run_flags, rank_dirs, common",
    [
        (["--target-pipeline-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
         ["mp_rank_00_000", "mp_rank_00_001"], []),
        (["--target-expert-parallel-size", "2"], ["--expert-model-parallel-size", "2"],
         ["mp_rank_00_000", "mp_rank_00_001"], ["--num-experts", "4", "--moe-router-topk", "2"]),
    ],
    ids=["pp2", "moe-ep2"],
)
def test_reshard_torch_format_to_pipeline_and_expert_parallel(tmp_path, target, run_flags, rank_dirs, common):
    """PP and EP targets: Megatron's rank directories (mp_rank_TT_PPP, or _EEE for experts),
    and a run in the target layout loads them with the source's first loss."""
    from tests.training.gpt_runs import losses, run_gpt

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    run_gpt(1, common + ["--save", src, "--save-interval", "3", "--ckpt-format", "torch"], iters=3)
    _convert("--load-dir", src, "--save-dir", out, "--saver-ckpt-format", "torch", *target)
    files = sorted(glob.glob(os.path.join(out, "iter_0000003", "mp_rank_*", "model_optim_rng.pt")))
    assert [os.path.basename(os.path.dirname(f)) for f in files] == rank_dirs
    resume = common + ["--no-load-optim", "--no-load-rng", "--ckpt-format", "torch"]
    first = losses(run_gpt(1, ["--load", src] + resume, iters=4))[0]
    converted = losses(run_gpt(2, ["--load", out] + run_flags + resume, iters=4))[0]
    assert abs(first - converted) < 1e-4 * max(1.0, abs(first))


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert.main(["--model-type", "GPT", "--save-dir", str(tmp_path / "x")])
    assert "--load-dir" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="--loader nosuch"):
        _convert("--loader", "nosuch", "--load-dir", str(tmp_path), "--save-dir", str(tmp_path / "y"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="config.json"):
        _convert("--loader", "hf", "--load-dir", str(tmp_path / "empty"), "--save-dir", str(tmp_path / "z"))
    with pytest.raises(ConversionError, match="not supported yet"):
        convert.main(["--model-type", "T5", "--load-dir", str(tmp_path), "--save-dir", str(tmp_path / "w")])
    with pytest.raises(ConversionError, match="latest_checkpointed_iteration"):
        _convert("--load-dir", str(tmp_path / "empty"), "--save-dir", str(tmp_path / "v"))
