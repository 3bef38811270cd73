"""Check the house rules that a linter does not know (docs/architecture.md, "Rules checked in CI").

    python tools/check_house_rules.py [ROOT]

Prints one line per violation (``path:line: RULE message``) and exits 1 if there is any,
0 otherwise. The rules, all cheap enough to run on every CI run:

- ``core-imports-training``: nothing under ``megatron/core`` imports ``megatron.training``
  (the library never depends on the application);
- ``print-in-core``: no ``print(...)`` call under ``megatron/core`` (the library logs);
- ``file-size``: a Python file has at most 800 lines;
- ``function-size``: a function or method has at most 100 lines;
- ``entry-size``: a ``pretrain_*.py`` entry point has at most 200 lines (it only wires a family
  into the one training loop);
- ``positional-bool``: the hot functions in ``KEYWORD_ONLY_BOOLS`` take their boolean
  parameters keyword-only, and no call to them or to ``checkpoint`` passes a bare ``True`` or
  ``False`` positionally (a reader cannot tell which switch it sets).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 100
MAX_ENTRY_LINES = 200
# Hot functions whose switches must be named at every call site.
KEYWORD_ONLY_BOOLS = ("column_parallel_matmul", "row_parallel_matmul", "_new_weight")
# Functions whose call sites must not pass a bare boolean positionally (Megatron's signature
# of tensor_parallel.checkpoint is positional, so only the call sites are checked).
NO_POSITIONAL_BOOL_CALLS = KEYWORD_ONLY_BOOLS + ("checkpoint",)
SKIPPED_DIRS = {".git", "build", "dist", "__pycache__", ".venv", "venv"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule} {self.message}"


def python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        # hidden folders (.git, .venv, local scratch) are not the project's sources
        if not SKIPPED_DIRS.intersection(parts) and not any(p.startswith(".") for p in parts[:-1]):
            yield path


def _called_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _is_bool_annotation(arg: ast.arg) -> bool:
    return isinstance(arg.annotation, ast.Name) and arg.annotation.id == "bool"


def _import_targets(node: ast.AST) -> List[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    return []


def check_tree(tree: ast.AST, rel: str, in_core: bool) -> Iterator[Violation]:
    """The AST rules for one file (``rel`` is its path relative to the checked root)."""
    for node in ast.walk(tree):
        if in_core:
            for target in _import_targets(node):
                if target == "megatron.training" or target.startswith("megatron.training."):
                    yield Violation(rel, node.lineno, "core-imports-training",
                                    f"imports {target}: megatron.core must not depend on megatron.training")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                yield Violation(rel, node.lineno, "print-in-core", "print() in the library: use logging")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield Violation(rel, node.lineno, "function-size",
                                f"{node.name} has {length} lines (at most {MAX_FUNCTION_LINES}): split it")
            if node.name in KEYWORD_ONLY_BOOLS:
                for arg in node.args.posonlyargs + node.args.args:
                    if _is_bool_annotation(arg):
                        yield Violation(rel, node.lineno, "positional-bool",
                                        f"{node.name}({arg.arg}: bool) must be keyword-only (after '*')")
        if isinstance(node, ast.Call) and _called_name(node) in NO_POSITIONAL_BOOL_CALLS:
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, bool):
                    yield Violation(rel, node.lineno, "positional-bool",
                                    f"{_called_name(node)}(..., {arg.value}, ...): name the switch")


def check_file(path: Path, root: Path) -> Iterator[Violation]:
    rel = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8")
    n_lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    if n_lines > MAX_FILE_LINES:
        yield Violation(rel, 1, "file-size", f"{n_lines} lines (at most {MAX_FILE_LINES}): split by concern")
    if path.parent == root and path.name.startswith("pretrain_") and n_lines > MAX_ENTRY_LINES:
        yield Violation(rel, 1, "entry-size",
                        f"{n_lines} lines (at most {MAX_ENTRY_LINES}): move family logic into the package")
    try:
        tree = ast.parse(text, filename=rel)
    except SyntaxError as exc:
        yield Violation(rel, exc.lineno or 1, "syntax", str(exc.msg))
        return
    yield from check_tree(tree, rel, in_core=rel.startswith("megatron/core/"))


def check_root(root: Path) -> List[Violation]:
    return [v for path in python_files(root) for v in check_file(path, root)]


def main(argv: List[str]) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parent.parent).resolve()
    violations = check_root(root)
    for violation in violations:
        print(violation)
    if violations:
        print(f"{len(violations)} house-rule violation(s); see tools/check_house_rules.py for the rules")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
