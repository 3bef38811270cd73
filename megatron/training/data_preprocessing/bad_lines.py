"""What happens to an input line that is not a valid document.

By default the run stops at the first one, in input order, with ``file:line: reason: snippet``.
With --skip-bad-lines such lines are skipped, counted, and written to a rejects file (JSON
lines ``{"file", "line", "error", "raw"}``, where ``raw`` is the line decoded as UTF-8 with
invalid bytes shown as ``\\xNN`` escapes). The rejects file appears by rename when the run
finishes, and only if something was rejected.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from megatron.training.data_preprocessing.encoder import BadLine


class BadInputError(ValueError):
    """The input has a bad line and --skip-bad-lines was not given."""


class BadLinePolicy:
    """Stop (``rejects_path`` None) or skip-and-record bad lines."""

    def __init__(self, rejects_path: Optional[str] = None):
        self.rejects_path = rejects_path
        self.count = 0
        self._tmp_path = f"{rejects_path}.tmp.{os.getpid()}" if rejects_path else None
        self._file = None

    @property
    def skipping(self) -> bool:
        return self.rejects_path is not None

    def handle(self, path: str, bad_lines: Sequence[BadLine]) -> None:
        """Deal with the bad lines of one batch of ``path`` (in line order)."""
        if not bad_lines:
            return
        if not self.skipping:
            first = bad_lines[0]
            raise BadInputError(
                f"{path}:{first.lineno}: {first.reason}: {first.snippet}\n"
                "Fix the line, or pass --skip-bad-lines to skip such lines and list them in a rejects file."
            )
        if self._file is None:
            self._file = open(self._tmp_path, "w", encoding="utf-8")
        for bad in bad_lines:
            record = {"file": path, "line": bad.lineno, "error": bad.reason,
                      "raw": bad.raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")}
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += len(bad_lines)

    def close(self, publish: bool = True) -> None:
        """Publish the rejects file (if any line was rejected and ``publish``), else drop it."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if publish:
            os.replace(self._tmp_path, self.rejects_path)
        elif os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)


def concatenate_rejects(parts: List[str], rejects_path: str) -> int:
    """Join per-partition rejects files (those that exist) into ``rejects_path``; return the line count."""
    present = [p for p in parts if os.path.exists(p)]
    if not present:
        return 0
    count = 0
    tmp = f"{rejects_path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as out:
        for part in present:
            with open(part, "rb") as f:
                for line in f:
                    out.write(line)
                    count += 1
            os.remove(part)
    os.replace(tmp, rejects_path)
    return count
