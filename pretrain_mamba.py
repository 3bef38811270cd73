"""Pretrain a Mamba-2 or hybrid language model: the entry Megatron-LM users know.

    torchrun --nproc-per-node N pretrain_mamba.py --hybrid-layer-pattern "MMMM" <Megatron-LM flags>

As in Megatron-LM, this runs pretrain_hybrid.py unchanged (same flags, same model).
"""

from __future__ import annotations

from pretrain_hybrid import main

if __name__ == "__main__":
    main()
