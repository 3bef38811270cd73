"""``--deterministic-mode``: bit-identical reruns (same seed, same layout, same machine).

As in Megatron: PyTorch's deterministic algorithms are switched on (an op without a
deterministic implementation then raises, naming itself, instead of running), cuBLAS gets the
fixed workspace it needs for reproducible GEMMs (``CUBLAS_WORKSPACE_CONFIG``), Transformer
Engine, where installed, is told not to pick non-deterministic kernels
(``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``), and NCCL must use one fixed all-reduce algorithm
(``NCCL_ALGO``). Options known to be non-deterministic are refused by name. (Megatron also
refuses ``--use-flash-attn``; here that flag has no effect: SDPA chooses the attention kernel,
under PyTorch's deterministic-algorithms rules.) Bit-identity is tested on CPU; on GPU it rests
on those PyTorch, cuBLAS and NCCL settings.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

logger = logging.getLogger(__name__)

# Megatron's accepted NCCL_ALGO values: each fixes the reduction order.
NCCL_ALGOS = ("Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS")
DEFAULT_NCCL_ALGO = "Ring"
CUBLAS_WORKSPACE = ":4096:8"

# flag dest -> (flag, why it breaks determinism)
NON_DETERMINISTIC = {
    "cross_entropy_loss_fusion": ("--cross-entropy-loss-fusion",
                                  "the fused cross entropy accumulates its gradient in a run-dependent order"),
}


def check_deterministic(args: argparse.Namespace) -> None:
    """Refuse the options and environment that cannot give bit-identical reruns."""
    if not args.deterministic_mode:
        return
    for dest, (flag, why) in NON_DETERMINISTIC.items():
        if getattr(args, dest, False):
            raise ValueError(f"{flag} cannot be combined with --deterministic-mode: {why}. "
                             f"Fix: drop {flag} or --deterministic-mode")
    algo = os.environ.get("NCCL_ALGO")
    if algo is not None and algo not in NCCL_ALGOS:
        raise ValueError(f"NCCL_ALGO={algo} cannot be combined with --deterministic-mode: the all-reduce "
                         f"algorithm must be fixed. Fix: set NCCL_ALGO to one of {', '.join(NCCL_ALGOS)}")


def apply_deterministic(args: argparse.Namespace) -> None:
    """Set the switches and environment; call before the process group and the first GEMM."""
    if not args.deterministic_mode:
        return
    os.environ.setdefault("NCCL_ALGO", DEFAULT_NCCL_ALGO)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if args.rank == 0:
        logger.info("deterministic mode: torch deterministic algorithms on, NCCL_ALGO=%s, "
                    "CUBLAS_WORKSPACE_CONFIG=%s", os.environ["NCCL_ALGO"], os.environ["CUBLAS_WORKSPACE_CONFIG"])
