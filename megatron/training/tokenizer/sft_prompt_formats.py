"""Conversation -> token ids and a per-token "trained" mask, for supervised fine-tuning (--sft).

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``
messages. The prompt formats (--sft-tokenizer-prompt-format) are:

- ``default``: the Hugging Face tokenizer's own chat template (``apply_chat_template``), or
  the jinja template given with --chat-template;
- ``nemotron-h-aligned`` (Megatron's default): ``<SPECIAL_10>System\\n{system}\\n``,
  ``<SPECIAL_11>User\\n{user}\\n<SPECIAL_11>Assistant\\n``, ``{assistant}\\n``;
- ``nemotron-nano-v2``: ``<SPECIAL_10>System\\n{system}\\n``, ``<SPECIAL_11>User\\n{user}\\n``,
  ``<SPECIAL_11>Assistant\\n{assistant}\\n<SPECIAL_12>\\n``, with ``/think`` and ``/no_think``
  removed from system and user text and the assistant header not trained.

The Nemotron formats strip each message's surrounding whitespace. Only assistant text (and
what the template writes after it up to the next turn, e.g. an end-of-turn token) is
trained; system and user turns, and the header that opens an assistant turn, are not.

Each piece of text is tokenized on its own and the ids are concatenated, so the trained
mask lines up with the ids by construction.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy

PROMPT_FORMATS = ("default", "nemotron-h-aligned", "nemotron-nano-v2")
ROLES = ("system", "user", "assistant")

# A conversation rendered as text pieces, each with whether its tokens carry loss.
Pieces = List[Tuple[str, bool]]


def check_conversation(conversation: Sequence[Dict], where: str) -> None:
    """ValueError naming ``where`` (file:line) when a conversation is not a list of
    {role, content} messages with known roles, each assistant turn after a user turn."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    previous = None
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"{where}: message {i} must be an object with a string 'role' and a string 'content', "
                             f"got {message!r}")
        role = str(message["role"]).lower()
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has role {message['role']!r}; the roles are {', '.join(ROLES)}")
        if role == "assistant" and previous != "user":
            raise ValueError(f"{where}: message {i} is an assistant turn that does not follow a user turn")
        if role == "assistant" and not message["content"]:
            raise ValueError(f"{where}: message {i} is an empty assistant turn (nothing to train on)")
        previous = role


def _drop_think(text: str) -> str:
    return text.replace("/think", "").replace("/no_think", "").strip()


def _nemotron_h_pieces(conversation: Sequence[Dict]) -> Pieces:
    pieces: Pieces = []
    for m in conversation:
        role, text = m["role"].lower(), m["content"].strip()
        if role == "system":
            pieces.append((f"<SPECIAL_10>System\n{text}\n", False))
        elif role == "user":
            pieces.append((f"<SPECIAL_11>User\n{text}\n<SPECIAL_11>Assistant\n", False))
        else:
            pieces.append((f"{text}\n", True))
    return pieces


def _nemotron_nano_v2_pieces(conversation: Sequence[Dict]) -> Pieces:
    pieces: Pieces = []
    for m in conversation:
        role = m["role"].lower()
        if role == "system":
            pieces.append((f"<SPECIAL_10>System\n{_drop_think(m['content'])}\n", False))
        elif role == "user":
            pieces.append((f"<SPECIAL_11>User\n{_drop_think(m['content'])}\n", False))
        else:
            pieces.append(("<SPECIAL_11>Assistant\n", False))
            pieces.append((f"{m['content'].strip()}\n<SPECIAL_12>\n", True))
    return pieces


_FORMAT_TOKENS = {"nemotron-h-aligned": ("<SPECIAL_10>", "<SPECIAL_11>"),
                  "nemotron-nano-v2": ("<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>")}
# The pad token each Nemotron format uses (Megatron's choice); ``default`` uses the
# tokenizer's pad token, or its end-of-document token when it has none.
_FORMAT_PAD = {"nemotron-h-aligned": "<SPECIAL_233>", "nemotron-nano-v2": "<unk>"}


class ConversationFormatter:
    """Renders and tokenizes conversations for one prompt format with a Hugging Face tokenizer.

    ``hf_tokenizer`` is a ``transformers`` tokenizer; ``chat_template`` (jinja, --chat-template)
    replaces its own template for the ``default`` format.
    """

    def __init__(self, hf_tokenizer, prompt_format: str, chat_template: str = None):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"--sft-tokenizer-prompt-format {prompt_format!r} is not supported; "
                             f"choose one of {', '.join(PROMPT_FORMATS)}")
        self._tok = hf_tokenizer
        self.prompt_format = prompt_format
        self._template = chat_template
        vocab = hf_tokenizer.get_vocab()
        if prompt_format == "default":
            if not (chat_template or getattr(hf_tokenizer, "chat_template", None)):
                raise ValueError("--sft-tokenizer-prompt-format default needs a chat template: the tokenizer in "
                                 "--tokenizer-model has none (no chat_template in its tokenizer_config.json); "
                                 "pass one with --chat-template or choose a Nemotron prompt format")
            self.pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id
            return
        missing = [t for t in _FORMAT_TOKENS[prompt_format] + (_FORMAT_PAD[prompt_format],) if t not in vocab]
        if missing:
            raise ValueError(f"--sft-tokenizer-prompt-format {prompt_format} needs the tokens {', '.join(missing)} "
                             "in the tokenizer of --tokenizer-model; use a Nemotron tokenizer, or the format "
                             "'default' (the tokenizer's chat template)")
        self.pad = vocab[_FORMAT_PAD[prompt_format]]

    def _render(self, conversation: Sequence[Dict], add_generation_prompt: bool) -> str:
        if not conversation:
            return ""
        return self._tok.apply_chat_template(list(conversation), tokenize=False, chat_template=self._template,
                                             add_generation_prompt=add_generation_prompt)

    def _template_pieces(self, conversation: Sequence[Dict]) -> Pieces:
        """Cut the template's rendering of the whole conversation where each turn starts.

        An assistant turn starts where the rendering of the messages before it, with the
        generation prompt (the assistant header), ends: the header is prompt, not trained."""
        full = self._render(conversation, add_generation_prompt=False)
        starts = []
        for k, message in enumerate(conversation):
            prefix = self._render(conversation[:k], add_generation_prompt=message["role"].lower() == "assistant")
            if not full.startswith(prefix) or (starts and len(prefix) < starts[-1]):
                raise ValueError(
                    "the chat template does not render a conversation as the concatenation of its turns (the "
                    f"text up to message {k} is not a prefix of the whole), so the assistant tokens cannot be "
                    "told apart; pass a template that does with --chat-template")
            starts.append(len(prefix))
        starts[0] = 0
        ends = starts[1:] + [len(full)]
        return [(full[a:b], m["role"].lower() == "assistant") for m, a, b in zip(conversation, starts, ends)]

    def pieces(self, conversation: Sequence[Dict]) -> Pieces:
        """The conversation's text pieces and whether each is trained."""
        if self.prompt_format == "nemotron-h-aligned":
            return _nemotron_h_pieces(conversation)
        if self.prompt_format == "nemotron-nano-v2":
            return _nemotron_nano_v2_pieces(conversation)
        return self._template_pieces(conversation)

    def tokenize(self, conversation: Sequence[Dict]) -> Tuple[numpy.ndarray, numpy.ndarray]:
        """int64 token ids [n] and bool trained [n] of one (already checked) conversation."""
        ids: List[int] = []
        trained: List[bool] = []
        for text, is_trained in self.pieces(conversation):
            piece = self._tok.encode(text, add_special_tokens=False) if text else []
            ids.extend(piece)
            trained.extend([is_trained] * len(piece))
        return numpy.asarray(ids, dtype=numpy.int64), numpy.asarray(trained, dtype=bool)
