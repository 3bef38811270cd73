"""Pretrain a GPT (and LLaMA/Mistral/Qwen-style) language model.

    torchrun --nproc-per-node N pretrain_gpt.py <Megatron-LM flags>
    torchrun --nproc-per-node N --no-python megatron-pretrain-gpt <Megatron-LM flags>   (installed)
"""

from __future__ import annotations

from functools import partial

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.gpt_masks import document_causal_mask
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.context_parallel import get_batch_on_this_cp_rank
from megatron.core.transformer.enums import ModelType
from megatron.training import get_args, get_tokenizer, pretrain, print_rank_0
from megatron.training.config_from_args import core_transformer_config_from_args
from megatron.training.data_iterators import is_dataset_built_on_rank as _built_on
from megatron.training.datasets.blend_args import dataset_config_kwargs
from megatron.training.datasets.fim_dataset import GPTFIMDataset, GPTFIMDatasetConfig, fim_config_kwargs
from megatron.training.datasets.sft_dataset import SFTDataset, SFTDatasetConfig, sft_config_kwargs
from megatron.training.initialize import shutdown_megatron
from megatron.training.language_model_args import language_model_kwargs


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None) -> GPTModel:
    """The GPT model of this pipeline stage, shaped by the command line."""
    args = get_args()
    config = core_transformer_config_from_args(args)
    print_rank_0("building GPT model ...")
    return GPTModel(
        config=config,
        **language_model_kwargs(args, pre_process, post_process),
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        vp_stage=vp_stage,
    )


_INT_KEYS = ["tokens", "labels", "position_ids"]


def get_batch(data_iterator, needs_data=None):
    """This rank's micro-batch: read on tensor-parallel rank 0, broadcast to the others.

    ``needs_data`` False (a model chunk with neither embedding nor loss) reads nothing."""
    pg = parallel_state.get_process_groups()
    if needs_data is None:
        needs_data = pg.is_pipeline_first_stage() or pg.is_pipeline_last_stage()
    if not needs_data:
        return None, None, None, None, None
    data = next(data_iterator) if data_iterator is not None else None
    args = get_args()
    # Shapes from the arguments: no size round trip through the host per micro-batch.
    mbs, seq = args.micro_batch_size, args.seq_length
    shapes = {"tokens": (mbs, seq), "labels": (mbs, seq), "position_ids": (mbs, seq), "loss_mask": (mbs, seq),
              "attention_mask": (mbs, 1, seq, seq)}
    ints = tensor_parallel.broadcast_data(_INT_KEYS, data, torch.int64, pg.tp, shapes)
    floats = tensor_parallel.broadcast_data(["loss_mask"], data, torch.float32, pg.tp, shapes)
    # Only a document mask is needed; a plain causal mask is implied. --sft keeps packed
    # conversations apart with the mask its data loader always builds.
    needs_mask = args.reset_attention_mask or args.sft
    attention_mask = _document_mask(data, ints["tokens"], pg.tp, shapes) if needs_mask else None
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {
        "tokens": ints["tokens"].to(device, non_blocking=True),
        "labels": ints["labels"].to(device, non_blocking=True),
        "loss_mask": floats["loss_mask"].to(device, non_blocking=True),
        "attention_mask": None if attention_mask is None else attention_mask.to(device, non_blocking=True),
        "position_ids": ints["position_ids"].to(device, non_blocking=True),
    }
    # Context parallelism: keep this rank's chunks i and 2CP-1-i; positions stay global.
    batch = get_batch_on_this_cp_rank(batch, pg.cp)
    return tuple(batch[k] for k in ("tokens", "labels", "loss_mask", "attention_mask", "position_ids"))


def _document_mask(data, tokens: torch.Tensor, tp_group, shapes) -> torch.Tensor:
    """bool [b, 1, s, s] (True = masked) for --reset-attention-mask and --sft: the data
    loader's mask, moved as bytes (the broadcast carries no bool), or, with
    --no-create-attention-mask-in-dataloader and without --sft (a chat template may write
    the end-of-document token inside a conversation), built here from the broadcast tokens."""
    if not (get_args().create_attention_mask_in_dataloader or get_args().sft):
        return document_causal_mask(tokens, get_tokenizer().eod)
    if data is not None:
        data = {"attention_mask": data["attention_mask"].to(torch.uint8)}
    masks = tensor_parallel.broadcast_data(["attention_mask"], data, torch.uint8, tp_group, shapes)
    return masks["attention_mask"].bool()


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses, the token count, and the [sum, count] report."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """One micro-batch forward: the per-token losses and the function that reduces them."""
    core = model.module if hasattr(model, "module") else model
    needs_data = getattr(core, "pre_process", True) or getattr(core, "post_process", True)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, needs_data)
    # Multi-token prediction masks its shifted losses with the same mask.
    mtp = {"loss_mask": loss_mask} if getattr(core, "mtp", None) is not None else {}
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, **mtp)
    return output_tensor, partial(loss_func, loss_mask)


def is_dataset_built_on_rank() -> bool:
    """Data is read on tensor-parallel rank 0 of the first and last pipeline stages."""
    return _built_on(parallel_state.get_process_groups())


def core_gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    """The GPT dataset config the command line describes (--mock-data when no blend;
    fill-in-the-middle with --fim-data; packed conversations with --sft)."""
    config_type, extra = (GPTFIMDatasetConfig, fim_config_kwargs(args)) if args.fim_data else (GPTDatasetConfig, {})
    if args.sft:
        config_type, extra = SFTDatasetConfig, sft_config_kwargs(args)
    # get_batch only moves a mask when documents are masked from each other; a plain
    # causal mask is implied, so building one per sample would be wasted work.
    mask_kwargs = dict(create_attention_mask=args.reset_attention_mask and args.create_attention_mask_in_dataloader)
    return config_type(
        **dataset_config_kwargs(args, get_tokenizer()),
        **{**mask_kwargs, **extra},
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Train, validation and test datasets from --data-path (or the per-split paths, or --mock-data)."""
    args = get_args()
    config = core_gpt_dataset_config_from_args(args)
    dataset_type = MockGPTDataset if config.mock else GPTFIMDataset if args.fim_data else GPTDataset
    dataset_type = SFTDataset if args.sft else dataset_type
    print_rank_0(f"> building train, validation, and test datasets for GPT ({dataset_type.__name__}) ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, is_dataset_built_on_rank, config
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return tuple(datasets)


def main() -> None:
    """Train with the command line's flags (also the ``megatron-pretrain-gpt`` command)."""
    pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step)
    shutdown_megatron()


if __name__ == "__main__":
    main()
