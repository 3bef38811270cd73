"""Megatron-LM's own example scripts run here unchanged apart from sizes, paths and GPU-only
options: each script's flag set (tests/training/megatron_example_flags.py) is scaled down and
trained for 3 iterations on CPU with mock data, and its dropped options are checked to be the
ones that really must go."""

import re

import pytest

from megatron.training.arguments import parse_and_validate, parse_args
from tests.multirank import run_on_ranks
from tests.training import bert_runs, gpt_runs
from tests.training.megatron_example_flags import EXAMPLES, ExampleScript, _groups, scaled_argv

ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*")
LOSS = re.compile(r"lm loss: ([0-9.Ee+-]+|nan|inf) ")
SKIPPED = re.compile(r"number of skipped iterations:\s+(\d+)")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_script_flags_all_parse(name):
    """Every flag the script passes is known, including the ones the CI run drops."""
    script = EXAMPLES[name]
    args = parse_args(args=script.flags)
    assert args.num_layers is not None


def _without(script: ExampleScript, keep: str, tmp: str):
    """The CI argv with the dropped flag ``keep`` put back as the script has it."""
    values = dict(_groups(script.flags))[keep]
    return scaled_argv(script, tmp) + [keep] + values


@pytest.mark.parametrize("name,flag", [(n, f) for n, s in sorted(EXAMPLES.items()) for f in s.dropped])
def test_dropped_flags_are_still_refused(name, flag, tmp_path):
    """A dropped option must still be one this framework refuses on CPU: once it is supported
    (fp8 on a GPU build, say), this fails and the option goes back into the CI run."""
    script = EXAMPLES[name]
    with pytest.raises(ValueError, match=re.escape(flag) + r"|fp8"):
        parse_and_validate(_without(script, flag, str(tmp_path)), world_size=script.world_size, rank=0)


def _assert_trained(log: str, name: str) -> None:
    iterations = [m.group(0) for m in ITERATION.finditer(log)]
    assert [int(ITERATION.match(i).group(1)) for i in iterations] == [1, 2, 3], f"{name}: {log[-3000:]}"
    for line in iterations:
        loss = LOSS.search(line)
        assert loss is not None and 0.0 < float(loss.group(1)) < 20.0, f"{name}: {line}"
        assert SKIPPED.search(line).group(1) == "0", f"{name}: {line}"


def _last_rank_log(script: ExampleScript, argv, tmp_path) -> str:
    if script.entry == "bert":
        bert_runs.write_vocab(tmp_path / "vocab.txt")
        return run_on_ranks(bert_runs._run_pretrain, script.world_size, args=(argv,), timeout=300)[-1][0]
    return run_on_ranks(gpt_runs._run_pretrain, script.world_size, args=(argv, None), timeout=300)[-1]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_script_trains_on_cpu(name, tmp_path):
    script = EXAMPLES[name]
    argv = scaled_argv(script, str(tmp_path))
    _assert_trained(_last_rank_log(script, argv, tmp_path), name)
    if "--save" in argv:
        assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_vocab_and_merge_files_without_a_type_mean_gpt2_bpe():
    """Megatron's GPT-3 scripts give --vocab-file and --merge-file but no --tokenizer-type."""
    from megatron.training.tokenizer.build import build_tokenizer
    from tests.training.megatron_example_flags import GPT2_MERGES, GPT2_VOCAB

    args = parse_args(args=["--vocab-file", GPT2_VOCAB, "--merge-file", GPT2_MERGES])
    assert args.tokenizer_type is None
    assert type(build_tokenizer(args)).__name__ == "GPT2BPETokenizer"
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer(parse_args(args=["--vocab-file", GPT2_VOCAB]))
