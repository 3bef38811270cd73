"""Is this project installed (with its dependencies) in the running Python?

    python examples/check_install.py [CHECKOUT]

Exit status 0 and "installed ..." when the ``megatron-lm-open`` distribution is installed and
every package it requires is present; 1 and the reason otherwise. The answer comes from the
installed distribution's metadata, never from an import: from the root of a clone,
``import megatron`` finds the working tree even when nothing is installed (and then numpy is
missing at the first real use). Metadata that lies in CHECKOUT itself (a ``*.egg-info`` left by
a build, seen through PYTHONPATH) is not an install either.

Runs on a bare Python: only the standard library.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sys
from typing import Optional, Tuple

DISTRIBUTION = "megatron-lm-open"


def _requirement_name(requirement: str) -> Optional[str]:
    """The package a ``Requires-Dist`` line names; None for one that only an extra needs."""
    name, _, marker = requirement.partition(";")
    if "extra" in marker:
        return None
    return re.split(r"[\s\[<>=!~(]", name.strip(), maxsplit=1)[0]


def check(checkout: Optional[str] = None) -> Tuple[bool, str]:
    """(installed, a one-line reason)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False, f"{DISTRIBUTION} is not installed"
    location = os.path.realpath(str(dist.locate_file("")))
    if checkout is not None and location == os.path.realpath(checkout):
        return False, (f"{DISTRIBUTION} is not installed (only build metadata inside the checkout "
                       f"{checkout} is visible)")
    for requirement in dist.requires or []:
        name = _requirement_name(requirement)
        if name is None:
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            return False, f"{DISTRIBUTION} is installed but its dependency {name} is missing"
    return True, f"{DISTRIBUTION} {dist.version} is installed ({location})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    installed, reason = check(argv[0] if argv else None)
    print(reason)
    return 0 if installed else 1


if __name__ == "__main__":
    sys.exit(main())
