"""tools/check_house_rules.py: the project passes it, and each rule catches a planted violation."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.check_house_rules import MAX_FILE_LINES, MAX_FUNCTION_LINES, check_root  # noqa: E402


def _plant(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _rules(root: Path):
    return sorted({v.rule for v in check_root(root)})


def test_the_project_follows_the_rules():
    violations = check_root(REPO)
    assert not violations, "\n".join(map(str, violations))


def test_a_clean_tree_passes(tmp_path):
    _plant(tmp_path, "megatron/core/ok.py", """
        import logging
        from megatron.core import parallel_state

        def f(x, *, flag: bool):
            logging.getLogger(__name__).info("fine")
            return checkpoint(f, flag, x)
    """)
    assert _rules(tmp_path) == []


@pytest.mark.parametrize("rel, text, rule", [
    ("megatron/core/a.py", "from megatron.training import get_args\n", "core-imports-training"),
    ("megatron/core/a.py", "import megatron.training.arguments\n", "core-imports-training"),
    ("megatron/core/a.py", "print('hello')\n", "print-in-core"),
    ("megatron/a.py", "x = 1\n" * (MAX_FILE_LINES + 1), "file-size"),
    ("megatron/a.py", "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES, "function-size"),
    ("pretrain_x.py", "x = 1\n" * 201, "entry-size"),
    ("megatron/a.py", "def _new_weight(shape, is_expert: bool):\n    pass\n", "positional-bool"),
    ("megatron/a.py", "y = column_parallel_matmul(x, w, None, g, True)\n", "positional-bool"),
    ("megatron/a.py", "y = tensor_parallel.random.checkpoint(run, False, q)\n", "positional-bool"),
])
def test_each_rule_catches_a_planted_violation(tmp_path, rel, text, rule):
    _plant(tmp_path, rel, text)
    assert _rules(tmp_path) == [rule]


def test_training_may_print_and_import_itself(tmp_path):
    _plant(tmp_path, "megatron/training/a.py", "from megatron.training import x\nprint(x)\n")
    assert _rules(tmp_path) == []


def test_command_line_exit_code_and_report(tmp_path):
    _plant(tmp_path, "megatron/core/a.py", "print(1)\n")
    bad = subprocess.run([sys.executable, str(REPO / "tools/check_house_rules.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "megatron/core/a.py:1: print-in-core" in bad.stdout
    (tmp_path / "megatron/core/a.py").write_text("x = 1\n")
    good = subprocess.run([sys.executable, str(REPO / "tools/check_house_rules.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout
