"""Supervised fine-tuning samples (--sft): packed conversations read from JSONL files.

As in Megatron-LM, the data is read as JSONL directly (no tools/preprocess_data.py step):
each --data-path entry is a ``.jsonl`` file, one sample per line, each line an object whose
``"messages"`` is a list of ``{"role": "system"|"user"|"assistant", "content": str}``. A line
may hold several conversations one after the other; each ``system`` message starts a new one.
The split (--split) and blends apply to lines. Sample ``i`` of a split is line
``indices[i % len(indices)]``: the lines in file order, repeated when more samples are asked
for than the split holds (the dataset does not shuffle; --dataloader-type cyclic does).

One line becomes one --seq-length sample:

- each conversation is tokenized with the tokenizer's prompt format
  (--sft-tokenizer-prompt-format) and ends with the end-of-document token (added unless the
  template wrote it); position ids restart at 0 for each conversation;
- the loss covers the tokens whose target is assistant text (and the closing end-of-document);
  system and user turns and padding carry none;
- the attention mask keeps every conversation to itself (causal within it), so packed
  conversations never see each other;
- a line longer than --seq-length + 1 tokens is truncated on the right, as Megatron-LM does:
  the sample keeps its first --seq-length tokens, the last of which then has no target, and
  the conversations after the cut are dropped; each truncation is counted and logged;
- a shorter line is padded to --seq-length with the format's pad token (no loss).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy
import torch

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.split import Split
from megatron.training.tokenizer.sft_prompt_formats import check_conversation

logger = logging.getLogger(__name__)


@dataclass
class SFTDatasetConfig(GPTDatasetConfig):
    """Configuration of SFT datasets; the tokenizer must offer ``tokenize_conversation``
    (``--tokenizer-type SFTTokenizer``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mock:
            raise ValueError("--sft needs the .jsonl files of conversations in --data-path (or the per-split "
                             "paths); it has no mock data")
        if not hasattr(self.tokenizer, "tokenize_conversation"):
            raise ValueError(f"--sft needs --tokenizer-type SFTTokenizer (a Hugging Face tokenizer directory in "
                             f"--tokenizer-model, formatted by --sft-tokenizer-prompt-format); got "
                             f"{type(self.tokenizer).__name__}")
        if self.tokenizer.eod is None:
            raise ValueError("--sft: the tokenizer of --tokenizer-model has no end-of-sequence token to end "
                             "each conversation with; use a tokenizer that defines eos_token")


class SFTLowLevelDataset:
    """The conversations of one JSONL file. Every line is parsed and checked once, when the
    file is opened (a bad line names the file and line); afterwards only the byte offsets of
    the lines are kept and a line is parsed again when its sample is read, so a large file
    costs memory-mapped bytes, not Python objects, in every data loader worker."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"--sft: the data path {path!r} is not a file; give the .jsonl files of conversations "
                             "themselves to --data-path (SFT data is not preprocessed into .bin/.idx)")
        self.path = path
        starts, ends, numbers = [], [], []
        conversations = 0
        offset = 0
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    where = f"{path}:{number}"
                    conversations += len(split_conversations(_parse_line(_decode(raw, where), where)))
                    starts.append(offset)
                    ends.append(offset + len(raw))
                    numbers.append(number)
                offset += len(raw)
        if not starts:
            raise ValueError(f"--sft: {path} holds no conversations")
        self._bytes = numpy.memmap(path, dtype=numpy.uint8, mode="r")
        self._starts, self._ends = numpy.asarray(starts, dtype=numpy.int64), numpy.asarray(ends, dtype=numpy.int64)
        self.line_numbers = numpy.asarray(numbers, dtype=numpy.int64)
        logger.info("--sft: %s holds %d lines, %d conversations", path, len(starts), conversations)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, idx: int) -> List[Dict]:
        raw = self._bytes[self._starts[idx]:self._ends[idx]].tobytes()
        return json.loads(raw.decode("utf-8"))["messages"]


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from err


def _parse_line(line: str, where: str) -> List[Dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); each line must be one object "
                         "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]}") from err
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError(f"{where}: each line must be an object with a \"messages\" list")
    messages = record["messages"]
    for conversation in split_conversations(messages if isinstance(messages, list) else None):
        check_conversation(conversation, where)
    return messages


def split_conversations(messages: Optional[List[Dict]]) -> List[List[Dict]]:
    """The conversations of one line: a new one starts at every system message."""
    if not messages:
        return [messages]
    conversations: List[List[Dict]] = []
    for message in messages:
        is_system = isinstance(message, dict) and str(message.get("role", "")).lower() == "system"
        if is_system or not conversations:
            conversations.append([])
        conversations[-1].append(message)
    return conversations


class SFTDataset(MegatronDataset):
    """Packed, padded SFT samples of one JSONL file's split (see the module docstring).

    A sample holds ``tokens``, ``labels``, ``position_ids`` (int64 [S]), ``loss_mask``
    (float [S]) and, with ``create_attention_mask``, ``attention_mask`` (bool [1, S, S],
    True = masked)."""

    def __init__(self, dataset: SFTLowLevelDataset, dataset_path: Optional[str], indices: numpy.ndarray,
                 num_samples: Optional[int], index_split: Split, config: SFTDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.truncated = 0

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: SFTLowLevelDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: SFTDatasetConfig) -> SFTLowLevelDataset:
        return SFTLowLevelDataset(dataset_path)

    def __len__(self) -> int:
        return len(self.indices) if self.num_samples is None else self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        line = int(self.indices[idx % len(self.indices)])
        tokens, trained, positions, segments = self._pack(line)
        length = self.config.sequence_length
        segments_t = torch.from_numpy(segments[:length])
        sample = {
            "tokens": torch.from_numpy(tokens[:-1]),
            "labels": torch.from_numpy(tokens[1:]),
            "loss_mask": torch.from_numpy(trained[1:].astype(numpy.float32)),
            "position_ids": torch.from_numpy(positions[:-1]),
        }
        if self.config.create_attention_mask:
            index = torch.arange(length)
            allowed = (index.unsqueeze(1) >= index.unsqueeze(0)) & (segments_t.unsqueeze(1) == segments_t.unsqueeze(0))
            sample["attention_mask"] = (~allowed).unsqueeze(0)
        return sample

    def _pack(self, line: int):
        """Token ids, trained flags, position ids and conversation numbers, each [S + 1]."""
        tokenizer = self.config.tokenizer
        eod, pad = tokenizer.eod, tokenizer.pad
        total = self.config.sequence_length + 1
        ids, trained, positions, segments = [], [], [], []
        conversations = split_conversations(self.dataset[line])
        for number, conversation in enumerate(conversations):
            conv_ids, conv_trained = tokenizer.tokenize_conversation(conversation)
            conv_ids, conv_trained = list(conv_ids), list(conv_trained)
            if not conv_ids or conv_ids[-1] != eod:
                conv_ids.append(eod)
                conv_trained.append(True)
            ids += conv_ids
            trained += conv_trained
            positions += range(len(conv_ids))
            segments += [number] * len(conv_ids)
            if len(ids) >= total:
                self._log_truncation(line, len(ids), len(conversations) - number - 1)
                keep = total - 1
                ids = ids[:keep] + [pad]
                trained = trained[:keep] + [False]
                return self._arrays(ids, trained, positions[:total], segments[:total])
        pad_len = total - len(ids)
        positions += list(range(positions[-1] + 1, positions[-1] + 1 + pad_len))
        segments += [segments[-1]] * pad_len
        ids += [pad] * pad_len
        trained += [False] * pad_len
        return self._arrays(ids, trained, positions, segments)

    @staticmethod
    def _arrays(ids, trained, positions, segments):
        return (numpy.asarray(ids, dtype=numpy.int64), numpy.asarray(trained, dtype=bool),
                numpy.asarray(positions, dtype=numpy.int64), numpy.asarray(segments, dtype=numpy.int64))

    def _log_truncation(self, line: int, length: int, dropped: int) -> None:
        # Logged at the first truncation and then at every power of two, so that a data set
        # of long conversations says how many were cut without a line per sample.
        self.truncated += 1
        if self.truncated & (self.truncated - 1) == 0:
            logger.warning(
                "--sft: line %d of %s packs %d tokens, more than --seq-length %d + 1: truncated on the right, "
                "%d later conversation(s) of that line dropped (%d truncated samples so far in this %s split "
                "reader)", self.dataset.line_numbers[line], self.dataset.path, length,
                self.config.sequence_length, dropped, self.truncated, self.index_split.name)


def sft_config_kwargs(args) -> dict:
    """The ``SFTDatasetConfig`` fields of --sft runs. Conversations are always kept apart by
    a mask built in the data loader (Megatron passes packed-sequence lengths instead), so
    --no-create-attention-mask-in-dataloader, often in Megatron's SFT scripts, changes nothing."""
    if args.mock_data:
        raise ValueError("--sft reads conversations from the .jsonl files of --data-path; it cannot be combined "
                         "with --mock-data")
    if args.fim_data:
        raise ValueError("--sft and --fim-data cannot be combined: FIM rewrites pretraining documents; drop one")
    if args.context_parallel_size > 1:
        raise ValueError(f"--sft is not supported with --context-parallel-size {args.context_parallel_size}: the mask "
                         "that keeps packed conversations apart is not split across context-parallel ranks; use 1")
    if args.is_hybrid_model:
        raise ValueError("--sft is not supported for hybrid (Mamba) models: their Mamba layers would carry state "
                         "from one packed conversation into the next; use pretrain_gpt.py")
    return dict(create_attention_mask=True)
