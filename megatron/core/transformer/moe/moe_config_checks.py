"""Validation of the MoE fields of a ``TransformerConfig`` (ValueError naming the flag)."""

from __future__ import annotations

from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern

_SCORE_FUNCTIONS = ("softmax", "sigmoid")
_BALANCING = ("aux_loss", "seq_aux_loss", "sinkhorn", "none")
_DISPATCHERS = ("allgather", "alltoall")
_DROP_POLICIES = ("probs", "position")


def _one_of(flag: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{flag} {value!r} is not supported: use one of {', '.join(choices)}")


def _check_routing(config) -> None:
    experts, topk = config.num_moe_experts, config.moe_router_topk
    if not 1 <= topk <= experts:
        raise ValueError(f"--moe-router-topk {topk} must be between 1 and --num-experts {experts}")
    _one_of("--moe-router-score-function", config.moe_router_score_function, _SCORE_FUNCTIONS)
    _one_of("--moe-router-load-balancing-type", config.moe_router_load_balancing_type, _BALANCING)
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ValueError(
            "--moe-router-num-groups and --moe-router-group-topk go together: give both "
            f"(got {groups} and {group_topk})"
        )
    if groups is not None:
        if experts % groups or not 1 <= group_topk <= groups or topk % group_topk:
            raise ValueError(
                f"group-limited routing needs --num-experts {experts} divisible by --moe-router-num-groups "
                f"{groups}, 1 <= --moe-router-group-topk {group_topk} <= groups, and --moe-router-topk "
                f"{topk} divisible by the group top-k: change these values"
            )
    if config.moe_router_enable_expert_bias and config.moe_router_score_function != "sigmoid":
        raise ValueError(
            "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (the bias "
            "is added to non-negative scores): set the score function"
        )
    if config.moe_router_load_balancing_type == "sinkhorn" and config.moe_router_score_function != "softmax":
        raise ValueError("--moe-router-load-balancing-type sinkhorn needs --moe-router-score-function softmax")
    if config.moe_router_dtype not in (None, "fp32", "fp64"):
        raise ValueError(f"--moe-router-dtype {config.moe_router_dtype!r}: use fp32 or fp64")


def _check_capacity(config) -> None:
    _one_of("--moe-token-drop-policy", config.moe_token_drop_policy, _DROP_POLICIES)
    factor = config.moe_expert_capacity_factor
    if factor is not None and factor <= 0:
        raise ValueError(f"--moe-expert-capacity-factor must be > 0, got {factor}; leave it out for dropless MoE")
    if config.moe_pad_expert_input_to_capacity and factor is None:
        raise ValueError(
            "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor (there is no "
            "capacity to pad to in dropless MoE): add a capacity factor"
        )


def _check_parallel(config) -> None:
    _one_of("--moe-token-dispatcher-type", config.moe_token_dispatcher_type, _DISPATCHERS)
    ep, experts = config.expert_model_parallel_size, config.num_moe_experts
    if experts % ep:
        raise ValueError(
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}: every "
            "expert-parallel rank needs the same number of experts"
        )
    etp = config.expert_tensor_parallel_size
    if config.moe_ffn_hidden_size % etp:
        raise ValueError(
            f"--moe-ffn-hidden-size {config.moe_ffn_hidden_size} is not divisible by "
            f"--expert-tensor-parallel-size {etp}"
        )
    if etp > 1 and config.add_bias_linear:
        raise ValueError(
            f"--expert-tensor-parallel-size {etp} with expert biases is not supported (each expert's "
            "fc2 bias would be added once per shard): add --disable-bias-linear or use ETP 1"
        )


def _check_options(config) -> None:
    if config.moe_shared_expert_gate and not config.moe_shared_expert_intermediate_size:
        raise ValueError(
            "--moe-shared-expert-gate gates the shared expert, which needs "
            "--moe-shared-expert-intermediate-size: add it, or drop the gate"
        )
    if config.moe_apply_probs_on_input and config.moe_router_topk != 1:
        raise ValueError(
            f"--moe-apply-probs-on-input needs --moe-router-topk 1 (got {config.moe_router_topk}): "
            "with several experts per token the input cannot carry each expert's prob"
        )


def check_moe_config(config) -> None:
    """Check the MoE fields and fill ``moe_ffn_hidden_size`` (default: ffn_hidden_size)."""
    experts = config.num_moe_experts
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"--num-experts must be a positive integer, got {experts!r}")
    if config.moe_ffn_hidden_size is None:
        config.moe_ffn_hidden_size = config.ffn_hidden_size
    moe_layer_pattern(config.num_layers, config.moe_layer_freq)
    _check_routing(config)
    _check_capacity(config)
    _check_parallel(config)
    _check_options(config)
