"""`pip install .` (not editable) gives a usable install: the commands run from any folder, the
tools import, and the source release holds what a release needs."""

import os
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
COMMANDS = ["megatron-pretrain-gpt", "megatron-pretrain-bert", "megatron-pretrain-mamba", "megatron-pretrain-hybrid",
            "megatron-preprocess-data", "megatron-convert-checkpoint", "megatron-merge-datasets",
            "megatron-verify-dataset", "megatron-text-generation-server", "megatron-text-generation-cli"]
_LEFT_BEHIND = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs", "__pycache__", "*.pyc")


def _run(cmd, cwd):
    """Run cmd without PYTHONPATH: a checkout on it would shadow the installed project."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{cmd}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the checkout, so builds leave nothing in it (and stale build/ output is not reused)."""
    # Builds run without isolation (offline): this Python's setuptools must read pyproject.toml's
    # SPDX license field, which needs setuptools 77.
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build this project without isolation")
    root = tmp_path_factory.mktemp("src") / "megatron-lm-open"
    shutil.copytree(REPO, root, ignore=_LEFT_BEHIND)
    return root


@pytest.fixture(scope="module")
def installed(source, tmp_path_factory):
    """The wheel installed in a fresh venv that reuses this Python's torch and numpy."""
    wheels = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, "."],
         source)
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # pip of the system site-packages, run by the venv's Python, installs into the venv; the
    # reinstall shadows a development install of the project outside it.
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", *wheels.glob("*.whl")], source)
    return env_dir


def test_commands_and_tools_work_outside_the_checkout(installed, tmp_path):
    bin_dir = installed / "bin"
    code = ("import megatron, pretrain_gpt, tools.checkpoint, tools.checkpoint.convert, tools.preprocess_data; "
            "print(megatron.__file__, pretrain_gpt.__file__, tools.checkpoint.__file__)")
    where = _run([bin_dir / "python", "-c", code], tmp_path)
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(installed.resolve()), where.stdout
    for command in COMMANDS:
        shown = _run([bin_dir / command, "--help"], tmp_path)
        assert shown.stdout.startswith(f"usage: {command}"), shown.stdout[:200]

    with open(DATA / "kjv_pentateuch.jsonl", "rb") as corpus:
        (tmp_path / "kjv3.jsonl").write_bytes(b"".join(corpus.readline() for _ in range(3)))
    _run([bin_dir / "megatron-preprocess-data", "--input", "kjv3.jsonl", "--output-prefix", "kjv3",
          "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", DATA / "gpt2" / "vocab.json",
          "--merge-file", DATA / "gpt2" / "merges.txt", "--append-eod", "--workers", "1"], tmp_path)
    checked = _run([bin_dir / "megatron-verify-dataset", "kjv3_text_document"], tmp_path)
    assert "kjv3_text_document: OK" in checked.stdout and "3 documents" in checked.stdout


def test_no_extra_names_an_unused_or_unrelated_package():
    """PyPI's `apex` is an unrelated web toolkit; nothing imports Transformer Engine, flash-attn or triton."""
    text = (REPO / "pyproject.toml").read_text()
    for name in ("apex", "transformer-engine", "flash-attn", "triton", "gpu-extensions"):
        assert f'"{name}' not in text and f"{name} =" not in text, name


def test_sdist_holds_what_a_release_needs(source, tmp_path):
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    name = _run([sys.executable, "-c", code, tmp_path], source).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    needed = ["pretrain_gpt.py", "LICENSE", "README.md", "pyproject.toml", "tools/preprocess_data.py",
              "tools/checkpoint/convert.py", "examples/run_tiny_gpt_cpu.sh", "examples/check_install.py",
              "examples/data/kjv_pentateuch.jsonl", "examples/data/gpt2/vocab.json",
              "examples/data/gpt2/merges.txt", "examples/data/gpt2/LICENSE", "examples/data/README.md",
              "docs/install.md", "tests/run_all.sh", "tests/packaging/test_wheel.py", "benchmarks/pretrain_bench.py"]
    missing = [path for path in needed if path not in members]
    assert not missing, missing
    assert not any("__pycache__" in m for m in members)
