"""Pretrain a Mamba-2 or hybrid language model: the entry Megatron-LM users know.

    torchrun --nproc-per-node N pretrain_mamba.py --hybrid-layer-pattern "MMMM" <Megatron-LM flags>

As in Megatron-LM, this runs pretrain_hybrid.py unchanged (same flags, same model).
"""

from __future__ import annotations

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_hybrid.py"),
                   run_name="__main__")
