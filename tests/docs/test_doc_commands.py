"""The documentation's command lines and flag names are true.

- every `--flag` the README and docs/ mention is an option of pretrain_gpt.py or of the tool,
  benchmark or launcher the text is about, and none is a flag this framework refuses outside
  the pages that list refused flags;
- every complete pretrain_gpt.py command line in them parses and validates for its world size,
  and their preprocess_data.py and convert.py command lines parse;
- the multi-node recipes, with the overrides docs/multinode.md shows, validate.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from megatron.training.arguments import build_parser, parse_and_validate
from megatron.training.flag_table import REFUSED, TABLE

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md"] + sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "flags.md")
# Pages whose subject is what is refused: they name refused flags on purpose.
LISTS_REFUSED = {"compatibility.md", "migration.md", "megatron_checkpoints.md", "data.md", "optimizer_memory.md"}
LAUNCHER_OPTIONS = {  # torchrun, srun and sbatch options used in the docs
    "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-backend",
    "--rdzv-endpoint", "--rdzv-id", "--standalone", "--max-restarts", "--nodes", "--ntasks-per-node",
    "--gpus-per-node", "--gpus-per-task", "--gpu-bind", "--cpus-per-task", "--signal",
}
# Options of other programs the docs show: pip, python -m build, tensorboard, torchrun --no-python.
EXTERNAL_OPTIONS = {"--index-url", "--sdist", "--logdir", "--no-python", "--no-deps"}
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z0-9][a-zA-Z0-9_-]*[a-zA-Z0-9](?![\w-])")


def _tool_options():
    """Option strings of the tools, benchmarks and launchers the docs show (not pretrain_gpt.py)."""
    from tools import merge_datasets, preprocess_data, verify_dataset
    from tools.checkpoint import convert, loader_core, loader_hf, saver_core, saver_hf

    parsers = [preprocess_data.get_parser(), merge_datasets.get_parser(),
               verify_dataset.get_parser(), convert._base_parser(False)]
    for module in (loader_core, loader_hf, saver_core, saver_hf):
        parsers.append(convert._base_parser(False))
        module.add_arguments(parsers[-1])
    from megatron.inference.server_args import add_text_generate_args

    parsers.append(add_text_generate_args(argparse.ArgumentParser()))
    options = {opt for p in parsers for a in p._actions for opt in a.option_strings}
    # The benchmark scripts build their parsers inside main(): read their option strings.
    for script in (REPO / "benchmarks").glob("*.py"):
        options |= set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', script.read_text()))
    return options | LAUNCHER_OPTIONS | EXTERNAL_OPTIONS


def test_every_flag_in_the_docs_exists_and_is_not_refused():
    gpt_options = {opt for action in build_parser()._actions for opt in action.option_strings}
    tool_options = _tool_options()
    problems = []
    for page in PAGES:
        for flag in sorted(set(FLAG.findall(page.read_text()))):
            if flag not in gpt_options | tool_options:
                problems.append(f"{page.name}: {flag} is no option of pretrain_gpt.py or the tools")
            elif (flag in TABLE and TABLE[flag].status == REFUSED and flag not in tool_options
                  and page.name not in LISTS_REFUSED):
                problems.append(f"{page.name}: {flag} is refused ({TABLE[flag].reason})")
    assert not problems, "\n".join(problems)


def _commands(text):
    """pretrain_gpt.py command lines (continuations joined) and their world sizes."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        if not re.search(r"pretrain_gpt\.py\s+--", line):
            continue
        head, _, flags = line.partition("pretrain_gpt.py")
        if "<" in flags or "$" in flags:
            continue  # a placeholder: not a complete command
        nproc = re.search(r"--nproc-per-node[ =](\d+)", head)
        nnodes = re.search(r"--nnodes[ =](\d+)", head)
        planned = re.search(r"--dry-run-world-size[ =](\d+)", flags)  # a dry run plans for N ranks
        world = int(nproc.group(1) if nproc else 1) * int(nnodes.group(1) if nnodes else 1)
        played = re.search(r"\bWORLD_SIZE=(\d+)", head)  # --fake-process-group plays a rank of N
        world = int(played.group(1)) if played else world
        yield shlex.split(flags), int(planned.group(1)) if planned else world


def test_complete_pretrain_gpt_commands_in_the_docs_validate():
    checked = 0
    for page in PAGES:
        for argv, world_size in _commands(page.read_text()):
            parse_and_validate(argv, world_size=world_size, rank=0)
            checked += 1
    assert checked >= 1


def _recipe_flags(tmp_path, script, env, extra):
    """The pretrain_gpt.py flags a recipe launches, recorded by a stand-in for python/srun."""
    record = tmp_path / "argv"
    fake = tmp_path / "bin" / "fake"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {record}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (fake.parent / "srun").symlink_to(fake)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHON": str(fake), **env}
    subprocess.run(["bash", str(REPO / script), *extra], env=env, cwd=REPO, check=True, capture_output=True)
    argv = record.read_text().splitlines()
    return argv[argv.index("pretrain_gpt.py") + 1:]


@pytest.mark.parametrize("script,env,extra,world_size", [
    ("examples/multinode/pretrain_gpt_torchrun_multinode.sh", {"NNODES": "2", "NPROC_PER_NODE": "2"},
     ["--train-iters", "300", "--tensor-model-parallel-size", "2"], 4),
    ("examples/multinode/pretrain_gpt.sbatch", {"SLURM_JOB_NUM_NODES": "4", "GPUS_PER_NODE": "2",
                                                 "MASTER_ADDR": "node0", "REPO_DIR": str(REPO)},
     ["--train-iters", "400", "--tensor-model-parallel-size", "2"], 8),
])
def test_multinode_recipes_with_the_documented_overrides_validate(tmp_path, script, env, extra, world_size):
    argv = _recipe_flags(tmp_path, script, env, extra)
    assert argv[-4:] == extra
    parse_and_validate(argv, world_size=world_size, rank=0)


def _tool_commands(script):
    """Argument lists of every ``python <script> ...`` line in the docs (continuations joined)."""
    for page in PAGES:
        for line in re.sub(r"\\\n\s*", " ", page.read_text()).splitlines():
            head, found, args = line.partition(f"python {script} ")
            if found and "<" not in args:
                yield page.name, shlex.split(args.split("#")[0])


def test_tool_command_lines_in_the_docs_parse(monkeypatch):
    from tools import preprocess_data
    from tools.checkpoint import convert

    monkeypatch.syspath_prepend(str(REPO / "tools" / "checkpoint"))  # where convert.py finds its plugins
    checked = 0
    for _page, argv in _tool_commands("tools/preprocess_data.py"):
        preprocess_data.get_parser().parse_args(argv)
        checked += 1
    for _page, argv in _tool_commands("tools/checkpoint/convert.py"):
        convert.parse(argv)
        checked += 1
    assert checked >= 4
