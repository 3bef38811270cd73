"""pretrain_gpt.py --sft end to end on CPU: a tiny GPT learns a small set of conversations."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import pretrain_gpt
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.training import global_vars
from megatron.training.arguments import parse_and_validate
from megatron.training.datasets.sft_dataset import SFTDataset, sft_config_kwargs
from megatron.training.tokenizer.build import build_tokenizer, vocab_size_with_padding
from tests.multirank import run_on_ranks
from tests.training.datasets.sft_assets import CHATML, write_tokenizer
from tests.training.gpt_runs import TINY_GPT, _run_pretrain, losses


def _argv(folder):
    tokenizer = write_tokenizer(folder / "tokenizer", chat_template=CHATML)
    data = folder / "chat.jsonl"
    with open(data, "w") as handle:
        for i in range(16):
            a, b = i % 4, i % 3
            messages = [{"role": "system", "content": "You add numbers."},
                        {"role": "user", "content": f"{a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    drop = {"--mock-data": 0, "--tokenizer-type": 1, "--vocab-size": 1, "--seq-length": 1,
            "--max-position-embeddings": 1, "--lr": 1}
    base, skip = [], 0
    for arg in TINY_GPT:
        if skip:
            skip -= 1
        elif arg in drop:
            skip = drop[arg]
        else:
            base.append(arg)
    return base + [
        "--sft", "--tokenizer-type", "SFTTokenizer", "--tokenizer-model", tokenizer,
        "--sft-tokenizer-prompt-format", "default", "--data-path", str(data), "--split", "100,0,0",
        "--seq-length", "48", "--max-position-embeddings", "48", "--lr", "3e-3", "--train-iters", "12",
        # Megatron's SFT scripts pass this; conversations stay apart all the same.
        "--no-create-attention-mask-in-dataloader",
    ]


def test_sft_run_trains_on_the_conversations(tmp_path):
    log = run_on_ranks(_run_pretrain, 1, args=(_argv(tmp_path), None), timeout=400)[-1]
    assert "building train, validation, and test datasets for GPT (SFTDataset)" in log
    values = losses(log)
    assert len(values) == 12
    # From ln(50k) ~ 10.8, the answers' tokens are learnt quickly: well over one nat lower.
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 1.5, values


@pytest.fixture
def sft_args(tmp_path):
    argv = [a for a in _argv(tmp_path) if a not in ("--distributed-backend", "gloo")]
    args = parse_and_validate(argv)
    global_vars.set_args(args)
    tokenizer = build_tokenizer(args)
    global_vars.set_tokenizer(tokenizer)
    args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, args)
    yield args
    global_vars.unset_global_variables()


def test_get_batch_keeps_packed_conversations_apart(sft_args, tmp_path):
    """Two conversations in one line: the mask reaches the model, so the second conversation's
    outputs do not depend on the first's tokens."""
    messages = [{"role": "system", "content": "One."}, {"role": "user", "content": "a b c"},
                {"role": "assistant", "content": "d e f"},
                {"role": "system", "content": "Two."}, {"role": "user", "content": "g h"},
                {"role": "assistant", "content": "i j"}]
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    sft_args.data_path = [str(path)]
    config = pretrain_gpt.core_gpt_dataset_config_from_args(sft_args)
    dataset = BlendedMegatronDatasetBuilder(SFTDataset, [2, None, None], lambda: True, config).build()[0]
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    tokens, labels, loss_mask, attention_mask, position_ids = pretrain_gpt.get_batch(iter([batch]))
    assert attention_mask is not None and torch.equal(attention_mask, batch["attention_mask"])
    second = int((position_ids[0] == 0).nonzero()[1])  # where positions restart
    assert tokens[0, second - 1] == global_vars.get_tokenizer().eod

    torch.manual_seed(0)
    model = pretrain_gpt.model_provider()
    per_token = model(tokens, position_ids, attention_mask, labels=labels)
    changed = tokens.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 1000
    after = model(changed, position_ids, attention_mask, labels=labels)
    assert torch.equal(after[:, second:], per_token[:, second:])
    assert not torch.equal(after[:, 1:second], per_token[:, 1:second])


@pytest.mark.parametrize("flag, value, message", [
    ("context_parallel_size", 2, "--context-parallel-size 2"),
    ("is_hybrid_model", True, "hybrid"),
    ("mock_data", True, "--mock-data"),
    ("fim_data", True, "--fim-data"),
])
def test_sft_refuses_what_cannot_keep_conversations_apart(flag, value, message):
    args = SimpleNamespace(mock_data=False, fim_data=False, context_parallel_size=1, is_hybrid_model=False)
    setattr(args, flag, value)
    with pytest.raises(ValueError, match=message):
        sft_config_kwargs(args)
