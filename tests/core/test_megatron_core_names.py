"""Megatron-Core names scripts import (``megatron.core.mpu``, ``megatron.core.utils``)
resolve to what this package provides, with Megatron-Core's behaviour."""

import pytest
import torch

from megatron.core import mpu, parallel_state, utils
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig


def test_mpu_is_parallel_state():
    for name in ("initialize_model_parallel", "get_tensor_model_parallel_world_size",
                 "get_data_parallel_rank", "is_pipeline_first_stage", "destroy_model_parallel"):
        assert getattr(mpu, name) is getattr(parallel_state, name)
    assert "get_tensor_model_parallel_group" in mpu.__all__


def test_torch_min_version():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert utils.is_torch_min_version(f"{major}.{minor}")
    assert utils.is_torch_min_version("1.0")
    assert not utils.is_torch_min_version(f"{major + 1}.0")
    assert not utils.is_torch_min_version(torch.__version__.split("+")[0], check_equality=False)


def test_group_helpers_without_distributed():
    assert utils.get_pg_size(None) == 1 and utils.get_pg_rank(None) == 0
    marker = object()
    assert utils.get_tensor_model_parallel_group_if_none(marker) is marker
    if not parallel_state.model_parallel_is_initialized():
        with pytest.raises(ValueError, match="initialize_model_parallel"):
            utils.get_tensor_model_parallel_group_if_none(None)
    assert utils.divide(12, 4) == 3
    with pytest.raises(ValueError, match="not divisible"):
        utils.divide(10, 4)


def test_wrapped_model_config_and_init_methods():
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True)
    model = GPTModel(config, vocab_size=32, max_sequence_length=8)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert utils.get_model_config(Wrapper(Wrapper(model))) is config
    assert utils.get_attr_wrapped_model(Wrapper(model), "config", return_model_obj=True) is model
    with pytest.raises(ValueError, match="no_such"):
        utils.get_attr_wrapped_model(Wrapper(model), "no_such")
    weight = torch.empty(4000)
    torch.manual_seed(0)
    utils.scaled_init_method_normal(0.02, 8)(weight)
    assert abs(weight.std().item() - 0.02 / 4) < 5e-4


def test_module_spec_builds_classes_imports_pairs_and_returns_functions():
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module, get_module

    linear = build_module(ModuleSpec(module=torch.nn.Linear, params={"bias": False}), 4, 3)
    assert isinstance(linear, torch.nn.Linear) and linear.bias is None and linear.weight.shape == (3, 4)
    # call-site kwargs win over the spec's params
    assert build_module(ModuleSpec(module=torch.nn.Linear, params={"bias": False}), 4, 3, bias=True).bias is not None
    assert isinstance(build_module(ModuleSpec(module=("torch.nn", "GELU"))), torch.nn.GELU)
    assert get_module(("torch.nn.functional", "gelu")) is torch.nn.functional.gelu
    assert build_module(ModuleSpec(module=torch.nn.functional.gelu)) is torch.nn.functional.gelu

    class WithSubmodules(torch.nn.Module):
        def __init__(self, submodules, width=2):
            super().__init__()
            self.inner = build_module(submodules, width, width)

    built = build_module(ModuleSpec(module=WithSubmodules, submodules=ModuleSpec(module=torch.nn.Linear)), width=5)
    assert built.inner.weight.shape == (5, 5)
    with pytest.raises(TypeError, match="building Linear from its ModuleSpec"):
        build_module(ModuleSpec(module=torch.nn.Linear, params={"no_such": 1}), 2, 2)
