"""The text generation server builds the model family the flags (or the checkpoint's
arguments) describe: the hybrid model for any hybrid layout flag, GPT otherwise; Megatron's
hybrid server name forces the hybrid model."""

import argparse
import os
import runpy
import sys

import pytest

from megatron.inference.model_loading import is_hybrid_model, model_provider_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(**overrides):
    values = dict(is_hybrid_model=None, hybrid_layer_pattern=None, hybrid_override_pattern=None,
                  hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("overrides", [dict(is_hybrid_model=True), dict(hybrid_layer_pattern="M*M-"),
                                       dict(hybrid_override_pattern="MM*"), dict(hybrid_attention_ratio=0.25),
                                       dict(hybrid_mlp_ratio=0.5)])
def test_any_hybrid_flag_selects_the_hybrid_model(overrides):
    import pretrain_hybrid

    assert is_hybrid_model(_args(**overrides))
    assert model_provider_for(_args(**overrides)) is pretrain_hybrid.model_provider


def test_gpt_flags_select_gpt():
    import pretrain_gpt

    assert not is_hybrid_model(_args())
    assert model_provider_for(_args()) is pretrain_gpt.model_provider


def test_hybrid_server_script_adds_is_hybrid_model(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    import run_text_generation_server

    seen = []
    monkeypatch.setattr(run_text_generation_server, "main", seen.append)
    monkeypatch.setattr(sys, "argv", ["run_hybrid_text_generation_server.py", "--load", "ckpt"])
    runpy.run_path(os.path.join(REPO, "tools", "run_hybrid_text_generation_server.py"), run_name="__main__")
    assert seen == [["--load", "ckpt", "--is-hybrid-model"]]
