"""Pretrain BERT (masked LM + sentence-order / binary head).

    torchrun --nproc-per-node N pretrain_bert.py <Megatron-LM flags>

Data: a sentence-level corpus (tools/preprocess_data.py --split-sentences) tokenized with
BertWordPieceLowerCase / BertWordPieceCase (or a HuggingFaceTokenizer with [CLS], [SEP],
[MASK] and [PAD]), or --mock-data. The loss is the masked-LM loss plus, with the binary
head, the sentence-order loss; both are logged (``lm loss``, ``sop loss``) as in Megatron.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.mock_bert_dataset import MockBERTMaskedWordPieceDataset
from megatron.core.models.bert import BertModel
from megatron.core.models.bert.masked_positions import masked_positions_limit
from megatron.core.transformer.enums import ModelType
from megatron.training import get_args, get_tokenizer, pretrain, print_rank_0
from megatron.training.config_from_args import core_transformer_config_from_args
from megatron.training.data_iterators import reads_data
from megatron.training.datasets.blend_args import dataset_config_kwargs
from megatron.training.flops import bert_floating_point_operations
from megatron.training.initialize import shutdown_megatron
from megatron.training.language_model_args import language_model_kwargs


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None) -> BertModel:
    """The BERT model of this pipeline stage, shaped by the command line.

    Token types: 2 with the binary head (Megatron's rule) and always with the post-LayerNorm
    (Hugging Face) layout, whose checkpoints always carry them."""
    args = get_args()
    config = core_transformer_config_from_args(args)
    num_tokentypes = 2 if args.bert_binary_head or args.transformer_block_type == "post_ln" else 0
    print_rank_0("building BERT model ...")
    return BertModel(
        config=config,
        num_tokentypes=num_tokentypes,
        **language_model_kwargs(args, pre_process, post_process),
        add_binary_head=args.bert_binary_head,
        vp_stage=vp_stage,
    )


def imports_headless_bert(args) -> bool:
    """The checkpoint's arguments say it was imported from a Hugging Face ``BertModel``
    (a sentence-embedding model: encoder and pooler, no LM or binary head)."""
    from megatron.training.checkpointing.checkpoint_args import IMPORTED_ARCHITECTURE

    return getattr(args, IMPORTED_ARCHITECTURE, None) == "BertModel"


def headless_model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None) -> BertModel:
    """The model of an imported headless ``BertModel``: the encoder and the pooler, no heads
    (what the converter and the server build for such a checkpoint; it is not trained here)."""
    args = get_args()
    return BertModel(core_transformer_config_from_args(args), num_tokentypes=2,
                     **language_model_kwargs(args, pre_process, post_process), add_binary_head=False,
                     add_lm_head=False, add_pooler=True, vp_stage=vp_stage)


_KEYS = ["text", "types", "labels", "is_random", "loss_mask", "padding_mask"]


def get_batch(data_iterator):
    """This rank's micro-batch, read on tensor-parallel rank 0 and broadcast to the others:
    (tokens, types, sentence_order, loss_mask, lm_labels, padding_mask)."""
    pg = parallel_state.get_process_groups()
    args = get_args()
    data = next(data_iterator) if data_iterator is not None else None
    mbs, seq = args.micro_batch_size, args.seq_length
    shapes = {key: (mbs, seq) for key in _KEYS}
    shapes["is_random"] = (mbs,)
    b = tensor_parallel.broadcast_data(_KEYS, data, torch.int64, pg.tp, shapes)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    b = {key: value.to(device, non_blocking=True) for key, value in b.items()}
    return b["text"], b["types"], b["is_random"], b["loss_mask"].float(), b["labels"], b["padding_mask"]


def loss_func(loss_mask: torch.Tensor, sentence_order: torch.Tensor, output_tensor):
    """Mean masked-LM loss of the micro-batch plus the sentence-order loss (Megatron's BERT
    loss: each averaged per micro-batch); reports ``lm loss`` and ``sop loss``."""
    lm_losses, sop_logits = output_tensor
    mask = loss_mask.float().reshape(-1)
    lm_loss = torch.sum(lm_losses.float().reshape(-1) * mask) / mask.sum()
    if sop_logits is None:
        return lm_loss, {"lm loss": lm_loss.detach()}
    sop_loss = F.cross_entropy(sop_logits.view(-1, 2).float(), sentence_order.view(-1), ignore_index=-1)
    return lm_loss + sop_loss, {"lm loss": lm_loss.detach(), "sop loss": sop_loss.detach()}


def forward_step(data_iterator, model):
    """One micro-batch forward: (lm losses, sop logits) and the function that reduces them."""
    args = get_args()
    # Every stage reads the micro-batch: its attention needs the padding mask.
    tokens, types, sentence_order, loss_mask, lm_labels, padding_mask = get_batch(data_iterator)
    if not (args.bert_binary_head or args.transformer_block_type == "post_ln"):
        types = None
    # The LM head runs on the masked positions only: the dataset marks at most this many.
    limit = masked_positions_limit(args.mask_prob, args.seq_length)
    output_tensor = model(tokens, padding_mask, tokentype_ids=types, lm_labels=lm_labels,
                          loss_mask=loss_mask, max_masked_positions=limit)
    return output_tensor, partial(loss_func, loss_mask, sentence_order)


def is_dataset_built_on_rank() -> bool:
    """Data is read on tensor-parallel rank 0 (``reads_data``) of every pipeline stage: each
    stage's attention needs the padding mask (as in Megatron's pretrain_bert)."""
    return reads_data(parallel_state.get_process_groups())


def bert_dataset_config_from_args(args) -> BERTMaskedWordPieceDatasetConfig:
    """The BERT dataset config the command line describes (--mock-data when no blend);
    masking settings are Megatron's pretrain_bert ones."""
    return BERTMaskedWordPieceDatasetConfig(
        **dataset_config_kwargs(args, get_tokenizer()),
        masking_probability=args.mask_prob,
        short_sequence_probability=args.short_seq_prob,
        masking_max_ngram=3,
        masking_do_full_word=True,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        classification_head=args.bert_binary_head,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Train, validation and test BERT datasets from --data-path (or per-split paths, or --mock-data)."""
    config = bert_dataset_config_from_args(get_args())
    dataset_type = MockBERTMaskedWordPieceDataset if config.mock else BERTMaskedWordPieceDataset
    print_rank_0(f"> building train, validation, and test datasets for BERT ({dataset_type.__name__}) ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, is_dataset_built_on_rank, config
    ).build()
    print_rank_0("> finished creating BERT datasets ...")
    return tuple(datasets)


def main() -> None:
    """Train with the command line's flags (also the ``megatron-pretrain-bert`` command)."""
    pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
             num_floating_point_operations_func=bert_floating_point_operations)
    shutdown_megatron()


if __name__ == "__main__":
    main()
