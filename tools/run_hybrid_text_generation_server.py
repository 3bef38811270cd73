"""Serve a Mamba/hybrid checkpoint: Megatron-LM's name for the hybrid text generation server.

    python tools/run_hybrid_text_generation_server.py --load CKPT --use-checkpoint-args <flags>

The same server as tools/run_text_generation_server.py (same flags, same routes), with
--is-hybrid-model set so that the hybrid model is built even when the checkpoint's
arguments or the command line do not say so. See docs/inference.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run_text_generation_server import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:] + ["--is-hybrid-model"])
