"""``--yaml-cfg FILE``: Megatron-LM's YAML configuration in place of the command line.

As in Megatron, the file replaces the command line: every value comes from the YAML (flags not
in it keep their defaults) and the other command-line flags are ignored, with a warning naming
them. The file's keys are the argument names (``num_layers``, ``lr``, ...), at the top level or
inside Megatron's two sections ``language_model`` (the transformer's fields) and
``model_parallel`` (parallelism and precision). Megatron spells a few transformer fields
differently from their flags (``num_moe_experts``, ``layernorm_epsilon``, ``activation_func``,
...), mapped below. Megatron's own config files also carry core-config fields that have no flag
(callbacks, communication tuning, kernel choices); those are accepted with the values this
framework always uses. Anything else is refused with a message naming the key, never dropped.
``${VAR}`` in a string value is replaced by that environment variable, as Megatron does.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any, Dict, List, Tuple

from megatron.training.flag_table import GIVEN_ATTR, TABLE, is_table_action

logger = logging.getLogger(__name__)

SECTIONS = ("language_model", "model_parallel")

# Megatron's core-config spelling -> this parser's argument name.
RENAMED = {
    "num_moe_experts": "num_experts",
    "layernorm_epsilon": "norm_epsilon",
    "layernorm_zero_centered_gamma": "apply_layernorm_1p",
}

# activation_func: the argument each of Megatron's values sets.
ACTIVATIONS = {"swiglu": {"swiglu": True}, "squaredrelu": {"squared_relu": True}, "gelu": {}}

ANY = object()
# Core-config fields without a flag: the values accepted (ANY: the field only tunes how
# something runs, chosen here at run time). null is always accepted.
NOT_FLAGS: Dict[str, Any] = {
    **{key: ANY for key in (
        "bias_activation_fusion", "persist_layer_norm", "memory_efficient_layer_norm",
        "clone_scatter_output_in_embedding", "async_tensor_model_parallel_allreduce",
        "tp_comm_split_ag", "tp_comm_atomic_ag", "tp_comm_split_rs", "tp_comm_atomic_rs",
        "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad", "batch_p2p_comm", "batch_p2p_sync",
        "deallocate_pipeline_outputs", "delay_grad_reduce", "delay_param_gather",
        "cpu_offloading_weights", "cpu_offloading_activations", "adlr_autoresume_interval",
        "enable_one_logger", "one_logger_project", "one_logger_run_name", "onnx_safe",
        "bert_binary_head", "retriever_seq_length", "fp8_wgrad")},
    # Set by the framework itself: a config file may only leave them empty (null).
    **{key: None for key in (
        "params_dtype", "pipeline_dtype", "autocast_dtype", "timers", "finalize_model_grads_func",
        "grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func", "_cpu_offloading_context",
        "tp_comm_overlap_cfg", "num_microbatches_with_partial_activation_checkpoints",
        "pipeline_model_parallel_split_rank", "init_method", "output_layer_init_method",
        "virtual_pipeline_model_parallel_size")},
    "gated_linear_unit": False,  # activation_func: swiglu is how a gated unit is asked for
    "moe_token_dropping": False,
    "enable_autocast": False,
    "variable_seq_lengths": False,
    "cpu_offloading": False,
    "use_legacy_models": False,
    "standalone_embedding_stage": False,
    "adlr_autoresume": False,
    "sample_rate": 1.0,
}

_ENV = re.compile(r"\$\{([^}]*)\}")


def _expand_env(value: Any, path: str, key: str) -> Any:
    if not isinstance(value, str):
        return value

    def replace(match):
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"--yaml-cfg {path}: key {key} uses ${{{name}}}, which is not set in the environment")
        return os.environ[name]

    return _ENV.sub(replace, value)


def read_yaml(path: str) -> Dict[str, Any]:
    """The file's keys, the two sections flattened into the top level."""
    try:
        import yaml
    except ImportError as err:
        raise ValueError("--yaml-cfg needs PyYAML: pip install pyyaml (or the 'yaml' extra)") from err
    if not os.path.isfile(path):
        raise ValueError(f"--yaml-cfg {path!r} is not an existing file; give the path of a YAML config")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"--yaml-cfg {path}: the file must hold a mapping of argument names to values")
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if key in SECTIONS and isinstance(value, dict):
            items = [(f"{key}.{sub}", sub, v) for sub, v in value.items()]
        else:
            items = [(key, key, value)]
        for shown, name, v in items:
            if name in flat:
                raise ValueError(f"--yaml-cfg {path}: key {shown} is set twice (at the top level and in a section)")
            flat[name] = (shown, _expand_env(v, path, shown))
    return flat


def _convert(action: argparse.Action, value: Any) -> Any:
    """A YAML value in the type the flag's parser would produce (YAML reads 1e-5 as a string)."""
    if value is None or action.type is None:
        return value
    if isinstance(value, list):
        return [action.type(v) if isinstance(v, str) else v for v in value]
    if action.nargs in ("+", "*") and isinstance(value, str):
        return [action.type(v) for v in value.split()]
    return action.type(value) if isinstance(value, str) else value


def _unmappable(path: str, shown: str, value: Any, why: str) -> ValueError:
    return ValueError(f"--yaml-cfg {path}: key {shown} = {value!r} {why}")


def apply_yaml(parser: argparse.ArgumentParser, given: argparse.Namespace, path: str) -> argparse.Namespace:
    """A namespace of the parser's defaults with the YAML file's values set."""
    dests = {a.dest: a for a in parser._actions if not is_table_action(a) and a.dest != "help"}
    args = parser.parse_known_args([])[0]
    flag_of = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    ignored = sorted(flag_of[k] for k, v in vars(given).items()
                     if k in flag_of and k != "yaml_cfg" and v != getattr(args, k, None))
    if ignored:
        logger.warning("--yaml-cfg %s replaces the command line; ignoring: %s", path, " ".join(ignored))
    table_given: List[Tuple[str, tuple]] = []
    for name, (shown, value) in read_yaml(path).items():
        name = RENAMED.get(name, name)
        flag = "--" + name.replace("_", "-")
        if name == "activation_func":
            if value not in ACTIVATIONS:
                raise _unmappable(path, shown, value, f"is not one of {', '.join(ACTIVATIONS)}")
            for dest, v in ACTIVATIONS[value].items():
                setattr(args, dest, v)
        elif name in dests:
            if name == "data_path" and isinstance(value, str):
                value = value.split()
            setattr(args, name, _convert(dests[name], value))
        elif flag in TABLE:
            if value not in (None, False):  # off: nothing asked of the missing machinery
                values = value if isinstance(value, list) else [] if value is True else [value]
                table_given.append((flag, tuple(str(v) for v in values)))
        elif name in NOT_FLAGS:
            accepted = NOT_FLAGS[name]
            if value is not None and accepted is not ANY and value != accepted:
                wanted = "null" if accepted is None else repr(accepted)
                raise _unmappable(path, shown, value, f"is not supported: this field is fixed here (use {wanted} or "
                                                  "remove the key)")
        elif value is not None:
            raise _unmappable(path, shown, value, "names no Megatron argument known here; check its spelling or "
                                              "remove the key")
    setattr(args, GIVEN_ATTR, table_given)
    args.yaml_cfg = path
    logger.info("arguments read from --yaml-cfg %s", path)
    return args
