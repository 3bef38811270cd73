"""An exported model.safetensors gets the permissions the umask gives any new file
(safetensors itself creates it 0600)."""

import os
import stat
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tools", "checkpoint"))


def test_exported_safetensors_follow_the_umask(tmp_path):
    pytest.importorskip("safetensors")
    from hf_files import SINGLE_FILE, write_model

    previous = os.umask(0o022)
    try:
        write_model(str(tmp_path), {"model_type": "gpt2"}, {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(str(tmp_path / SINGLE_FILE)).st_mode) == 0o644
