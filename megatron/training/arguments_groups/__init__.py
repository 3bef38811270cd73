"""Megatron's argument groups, one module per concern; ``add_megatron_arguments`` adds all."""

from __future__ import annotations

import argparse

from megatron.training.arguments_groups.activation_offload_args import add_activation_offload_args
from megatron.training.arguments_groups.bert import add_bert_args
from megatron.training.arguments_groups.checkpointing import add_checkpointing_args
from megatron.training.arguments_groups.config_help import fill_help_from_config
from megatron.training.arguments_groups.cuda_graphs import add_cuda_graph_args
from megatron.training.arguments_groups.data import add_data_args, add_tokenizer_args, add_validation_args
from megatron.training.arguments_groups.distributed import add_distributed_args
from megatron.training.arguments_groups.dry_run_args import add_dry_run_args
from megatron.training.arguments_groups.fim import add_fim_args
from megatron.training.arguments_groups.hybrid import add_hybrid_args
from megatron.training.arguments_groups.logging_args import add_logging_args, add_rerun_args
from megatron.training.arguments_groups.network import add_moe_args, add_network_size_args, add_transformer_impl_args
from megatron.training.arguments_groups.optimizer_memory import add_optimizer_memory_args
from megatron.training.arguments_groups.precision import add_mixed_precision_args
from megatron.training.arguments_groups.training import (
    add_initialization_args,
    add_learning_rate_args,
    add_regularization_args,
    add_training_args,
)

GROUP_ADDERS = (
    add_network_size_args,
    add_regularization_args,
    add_training_args,
    add_initialization_args,
    add_learning_rate_args,
    add_checkpointing_args,
    add_mixed_precision_args,
    add_distributed_args,
    add_validation_args,
    add_data_args,
    add_tokenizer_args,
    add_moe_args,
    add_logging_args,
    add_transformer_impl_args,
    add_rerun_args,
    add_dry_run_args,
    add_hybrid_args,
    add_bert_args,
    add_fim_args,
    add_optimizer_memory_args,
    add_activation_offload_args,
    add_cuda_graph_args,
)


def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every Megatron flag this framework knows to ``parser``; fill help from config docs."""
    for adder in GROUP_ADDERS:
        parser = adder(parser)
    fill_help_from_config(parser)
    return parser
