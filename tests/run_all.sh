#!/usr/bin/env bash
# Install what the test suite needs (if missing) and run the tests: every test, or what the
# arguments name (they go to pytest as they are: files, -k, -m, ...).
#
#   bash tests/run_all.sh                               # every test not marked slow (CI)
#   bash tests/run_all.sh tests                         # the whole suite
#   bash tests/run_all.sh tests/tools/test_convert.py -x
#
# Works on a fresh machine with only Python and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # The CPU build; pip resolves it from the local wheel cache or the package index.
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
if [ $# -eq 0 ]; then
    # CI's run: every test but those marked slow (variants of layouts and formats that other
    # tests already cover, and the longest multi-process runs). `bash tests/run_all.sh tests`
    # runs them all; `bash tests/run_all.sh -m slow` only the slow ones.
    set -- tests -m "not slow"
fi
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
