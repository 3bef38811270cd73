"""SFTTokenizer (--tokenizer-type SFTTokenizer): a Hugging Face tokenizer that also formats
conversations with a prompt format (--sft-tokenizer-prompt-format), for --sft."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import numpy

from megatron.training.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer
from megatron.training.tokenizer.sft_prompt_formats import ConversationFormatter


class SFTTokenizer(HuggingFaceTokenizer):
    """``HuggingFaceTokenizer`` plus ``tokenize_conversation``; ``pad`` is the prompt
    format's pad token and ``eod`` the tokenizer's end-of-sequence token."""

    def __init__(self, path: str, prompt_format: str, chat_template: Optional[str] = None, **kwargs):
        super().__init__(path, **kwargs)
        self.formatter = ConversationFormatter(self.hf_tokenizer, prompt_format, chat_template)
        self._chat_template = chat_template

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        ids = OrderedDict(super().unique_identifiers)
        ids["prompt_format"] = self.formatter.prompt_format
        ids["chat_template"] = self._chat_template
        return ids

    def tokenize_conversation(self, conversation: Sequence[Dict]) -> Tuple[numpy.ndarray, numpy.ndarray]:
        """Token ids [n] and bool trained [n] (True on assistant tokens) of one conversation."""
        return self.formatter.tokenize(conversation)

    @property
    def pad(self) -> int:
        return int(self.formatter.pad)
