"""Param groups under --apply-wd-to-qk-layernorm and --head-lr-mult."""

import logging

import torch

from megatron.core.optimizer import OptimizerConfig, get_param_groups
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.training.head_lr import head_lr_kwargs, is_head_param


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_qkv = torch.nn.Linear(4, 12)
        self.q_layernorm = torch.nn.LayerNorm(4)
        self.k_layernorm = torch.nn.LayerNorm(4)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attention = _Attention()
        self.input_layernorm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 2)


def _settings(groups, model):
    """{param name: (weight_decay, lr)} as the groups assign them."""
    by_id = {id(p): (g["weight_decay"], g["lr"]) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_qk_layernorm_params_get_weight_decay_only_with_the_flag():
    model = _Model()
    default = _settings(get_param_groups([model], OptimizerConfig(lr=1.0, weight_decay=0.1)), model)
    assert {name for name, (wd, _) in default.items() if wd} == {"self_attention.linear_qkv.weight", "head.weight"}
    flagged = _settings(get_param_groups([model], OptimizerConfig(lr=1.0, weight_decay=0.1,
                                                                  apply_wd_to_qk_layernorm=True)), model)
    decayed = {name for name, (wd, _) in flagged.items() if wd}
    # Megatron's rule is by name: every q/k layernorm param (weight and bias); other norms
    # and biases keep none.
    assert decayed == {"self_attention.linear_qkv.weight", "head.weight",
                       "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                       "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias"}
    assert all(wd == 0.1 for name, (wd, _) in flagged.items() if name in decayed)


def test_head_lr_mult_scales_the_head_params_and_the_schedule_keeps_it():
    model = _Model()
    config = OptimizerConfig(lr=1.0, weight_decay=0.0)
    groups = get_param_groups([model], config, **head_lr_kwargs(3.0, [model]))
    lrs = {name: lr for name, (_, lr) in _settings(groups, model).items()}
    assert lrs == {name: (3.0 if name.startswith("head.") else 1.0) for name, _ in model.named_parameters()}
    optimizer = torch.optim.SGD(groups, lr=1.0)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=0.5, min_lr=0.5, lr_warmup_steps=0,
                                        lr_decay_steps=10, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=10, wd_incr_style="constant")
    scheduler.step(1)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.5, 1.5]


def test_head_rule_is_megatrons_name_rule():
    p = torch.nn.Parameter(torch.zeros(1))
    assert is_head_param("module.module.head.weight", p) and is_head_param("head.bias", p)
    assert not is_head_param("lm_head.dense.weight", p) and not is_head_param("output_layer.weight", p)
    assert not is_head_param("binary_head.weight", p)


def test_head_lr_mult_on_a_model_without_a_head_says_it_has_no_effect(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with caplog.at_level(logging.WARNING):
        head_lr_kwargs(1.0, [model])
        assert not caplog.records
        head_lr_kwargs(2.0, [model])
    assert "--head-lr-mult 2.0 has no effect" in caplog.text
