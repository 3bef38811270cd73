"""examples/check_install.py, the install probe of examples/run_tiny_gpt_cpu.sh: it must answer
from the installed distribution, never from the working tree it is run in."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "examples" / "check_install.py"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv without the project, its dependencies or pip (no system site-packages)."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(root)
    return str(root / "bin" / "python")


def _probe(python, checkout, cwd, pythonpath):
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([python, str(PROBE), str(checkout)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def _metadata(folder: Path, requires=()):
    """Plant a distribution's metadata (as a build or an install leaves it) in folder."""
    info = folder / "megatron_lm_open-0.1.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: megatron-lm-open", "Version: 0.1.0"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_working_tree_does_not_count_as_installed(bare_python):
    """From the repository root, with the tree on PYTHONPATH, `import megatron` would succeed:
    the probe must still say "not installed"."""
    where = "import importlib.util; print(importlib.util.find_spec('megatron').origin)"
    shadowed = subprocess.run([bare_python, "-c", where], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=60)
    assert shadowed.stdout.strip() == str(REPO / "megatron" / "__init__.py"), shadowed.stderr
    proc = _probe(bare_python, REPO, REPO, REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "megatron-lm-open is not installed" in proc.stdout


def test_build_metadata_inside_the_checkout_is_not_an_install(bare_python, tmp_path):
    checkout = tmp_path / "clone"
    _metadata(checkout)
    proc = _probe(bare_python, checkout, checkout, checkout)
    assert proc.returncode == 1, proc.stdout
    assert "only build metadata inside the checkout" in proc.stdout


def test_missing_dependency_is_not_an_install(bare_python, tmp_path):
    site = tmp_path / "site"
    _metadata(site, requires=["torch>=2.4", 'pytest>=7; extra == "test"'])
    proc = _probe(bare_python, REPO, tmp_path, site)
    assert proc.returncode == 1, proc.stdout
    assert "its dependency torch is missing" in proc.stdout


def test_installed_distribution_with_dependencies_counts(bare_python, tmp_path):
    site = tmp_path / "site"
    _metadata(site, requires=['pytest>=7; extra == "test"'])
    proc = _probe(bare_python, REPO, tmp_path, site)
    assert proc.returncode == 0, proc.stdout
    assert "megatron-lm-open 0.1.0 is installed" in proc.stdout


def test_this_python_sees_the_project_installed():
    """The suite runs after `pip install -e .` (tests/run_all.sh): the probe agrees."""
    proc = subprocess.run([sys.executable, str(PROBE), str(REPO)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    if "not installed" in proc.stdout:
        pytest.skip("the project is not installed in this Python")
    assert proc.returncode == 0, proc.stdout
