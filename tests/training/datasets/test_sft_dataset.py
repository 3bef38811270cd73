"""--sft: conversation tokenization and loss masks, packing, truncation, order, and errors.

The tokenizer is GPT-2's BPE (shared test assets) as a Hugging Face tokenizer directory with a
ChatML-style chat template and, for the Nemotron format, Nemotron's special tokens added.
"""

from __future__ import annotations

import json
import logging

import numpy
import pytest
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.training.datasets.sft_dataset import SFTDataset, SFTDatasetConfig
from megatron.training.tokenizer.sft_tokenizer import SFTTokenizer
from tests.training.datasets.sft_assets import CHATML, write_tokenizer

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("chatml"), chat_template=CHATML)


@pytest.fixture(scope="module")
def chatml(chatml_dir):
    return SFTTokenizer(chatml_dir, prompt_format="default")


def _text(tok, ids):
    return tok.detokenize([int(i) for i in ids])


def test_chat_template_tokens_and_loss_on_assistant_turns_only(chatml):
    ids, trained = chatml.tokenize_conversation(TWO_TURNS)
    assert _text(chatml, ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>\n")
    # The assistant header is prompt; the answer and its end-of-turn are trained.
    assert _text(chatml, ids[trained]) == "Hello!<|im_end|>\nBye.<|im_end|>\n"
    first = int(numpy.flatnonzero(trained)[0])
    assert _text(chatml, ids[:first]).endswith("<|im_start|>assistant\n")


def test_nemotron_h_aligned_format(tmp_path):
    specials = ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_233>"]
    tok = SFTTokenizer(write_tokenizer(tmp_path, specials=specials), prompt_format="nemotron-h-aligned")
    ids, trained = tok.tokenize_conversation(TWO_TURNS)
    assert _text(tok, ids) == ("<SPECIAL_10>System\nBe brief.\n<SPECIAL_11>User\nHi\n<SPECIAL_11>Assistant\n"
                               "Hello!\n<SPECIAL_11>User\nBye\n<SPECIAL_11>Assistant\nBye.\n")
    assert _text(tok, ids[trained]) == "Hello!\nBye.\n"
    assert tok.pad == tok.hf_tokenizer.convert_tokens_to_ids("<SPECIAL_233>")


def test_nemotron_nano_v2_format(tmp_path):
    specials = ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<unk>"]
    tok = SFTTokenizer(write_tokenizer(tmp_path, specials=specials), prompt_format="nemotron-nano-v2")
    turns = [{"role": "system", "content": "Be brief. /no_think"}] + TWO_TURNS[1:3]
    ids, trained = tok.tokenize_conversation(turns)
    assert _text(tok, ids) == ("<SPECIAL_10>System\nBe brief.\n<SPECIAL_11>User\nHi\n<SPECIAL_11>Assistant\n"
                               "Hello!\n<SPECIAL_12>\n")
    assert _text(tok, ids[trained]) == "Hello!\n<SPECIAL_12>\n"


def test_formats_that_cannot_work_with_the_tokenizer_are_refused(tmp_path):
    plain = write_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="needs a chat template.*--chat-template"):
        SFTTokenizer(plain, prompt_format="default")
    with pytest.raises(ValueError, match="needs the tokens <SPECIAL_10>"):
        SFTTokenizer(plain, prompt_format="nemotron-h-aligned")
    with pytest.raises(ValueError, match="--sft-tokenizer-prompt-format 'alpaca'"):
        SFTTokenizer(plain, prompt_format="alpaca")
    # A template that writes earlier turns differently once more follow cannot be cut into turns.
    marks_last = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="not a prefix of the whole"):
        SFTTokenizer(plain, prompt_format="default", chat_template=marks_last).tokenize_conversation(TWO_TURNS)
    # --chat-template supplies the missing template.
    ids, trained = SFTTokenizer(plain, prompt_format="default", chat_template=CHATML).tokenize_conversation(TWO_TURNS)
    assert trained.any() and not trained.all()


def _write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _build(path, tok, seq, sizes=(None, None, None), split="100,0,0", seed=1234):
    config = SFTDatasetConfig(random_seed=seed, sequence_length=seq, blend=([path], None), split=split,
                              tokenizer=tok, create_attention_mask=True)
    return BlendedMegatronDatasetBuilder(SFTDataset, list(sizes), lambda: True, config).build()


def test_packed_conversations_do_not_see_each_other(tmp_path, chatml):
    first = TWO_TURNS[:3]
    second = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Ok?"},
              {"role": "assistant", "content": "Yes."}]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": first + second}])
    sample = _build(path, chatml, seq=96)[0][0]
    len1 = len(chatml.tokenize_conversation(first)[0]) + 1  # + the end-of-document token
    len2 = len(chatml.tokenize_conversation(second)[0]) + 1
    tokens, labels, loss_mask = sample["tokens"], sample["labels"], sample["loss_mask"]
    assert tokens[len1 - 1] == chatml.eod and tokens[len1 + len2 - 1] == chatml.eod
    # Position ids restart with the second conversation and run on through the padding.
    assert sample["position_ids"][:len1].tolist() == list(range(len1))
    assert sample["position_ids"][len1:96].tolist() == list(range(96 - len1))
    # Loss on exactly the answers and each closing end-of-document token.
    assert _text(chatml, labels[loss_mask.bool()]) == "Hello!<|im_end|>\n<|endoftext|>Yes.<|im_end|>\n<|endoftext|>"
    assert not loss_mask[len1 + len2 - 1:].any() and (tokens[len1 + len2:] == chatml.pad).all()
    mask = sample["attention_mask"][0]  # True = masked
    assert mask.shape == (96, 96)
    assert mask[len1:, :len1].all() and mask[:len1, len1:].all()
    def causal(n):
        return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)

    assert torch.equal(mask[:len1, :len1], causal(len1))
    assert torch.equal(mask[len1:, len1:], causal(96 - len1))  # the padding belongs to the last one


def test_a_line_longer_than_seq_length_is_truncated_and_logged(tmp_path, chatml, caplog):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS + TWO_TURNS}])
    full = chatml.tokenize_conversation(TWO_TURNS)[0]
    with caplog.at_level(logging.WARNING):
        sample = _build(path, chatml, seq=16)[0][0]
    assert sample["tokens"].tolist() == full[:16].tolist()
    assert sample["loss_mask"][-1] == 0  # its target was cut off
    assert "truncated on the right, 1 later conversation(s) of that line dropped" in caplog.text
    assert "line 1 of" in caplog.text


def test_samples_follow_the_line_order_and_repeat_deterministically(tmp_path, chatml):
    lines = [{"messages": [{"role": "user", "content": f"Question {i}"},
                           {"role": "assistant", "content": f"Answer {i}"}]} for i in range(10)]
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    train, valid, _ = _build(path, chatml, seq=24, sizes=(23, 4, None), split="80,20,0")
    again = _build(path, chatml, seq=24, sizes=(23, 4, None), split="80,20,0")[0]
    assert len(train) >= 23

    def answer(sample):
        return _text(chatml, sample["labels"][sample["loss_mask"].bool()])

    # The train split is lines 0-7, in file order, repeated; the validation split lines 8-9.
    assert [answer(train[i]) for i in range(10)] == [f"Answer {i % 8}<|im_end|>\n<|endoftext|>" for i in range(10)]
    assert answer(valid[1]) == "Answer 9<|im_end|>\n<|endoftext|>"
    for i in range(len(train)):
        assert all(torch.equal(train[i][k], again[i][k]) for k in train[i])


@pytest.mark.parametrize("line, message", [
    ("{\"messages\": [", r"d.jsonl:2: not valid JSON"),
    (json.dumps({"text": "hi"}), r"d.jsonl:2: each line must be an object with a \"messages\" list"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"d.jsonl:2: message 0 has role 'bot'"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), r"d.jsonl:2: .*does not follow a user"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, chatml, line, message):
    good = json.dumps({"messages": TWO_TURNS[1:3]})
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        _build(str(path), chatml, seq=32)


def test_sft_needs_a_conversation_tokenizer(tmp_path, chatml_dir):
    from megatron.training.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(ValueError, match="--tokenizer-type SFTTokenizer"):
        _build(path, HuggingFaceTokenizer(chatml_dir), seq=32)


def test_files_blend_by_weight(tmp_path, chatml):
    paths = []
    for name in "ab":
        lines = [{"messages": [{"role": "user", "content": f"{name}{i}"},
                               {"role": "assistant", "content": f"{name}"}]} for i in range(5)]
        paths.append(_write_jsonl(tmp_path / f"{name}.jsonl", lines))
    config = SFTDatasetConfig(random_seed=1, sequence_length=24, blend=(paths, [0.3, 0.7]), split="100,0,0",
                              tokenizer=chatml, path_to_cache=str(tmp_path / "cache"))
    blend = BlendedMegatronDatasetBuilder(SFTDataset, [20, 0, 0], lambda: True, config).build()[0]
    answers = [_text(chatml, blend[i]["labels"][blend[i]["loss_mask"].bool()])[0] for i in range(20)]
    assert (answers.count("a"), answers.count("b")) == (6, 14)
