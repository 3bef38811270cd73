"""Checkpoint save/load flags."""

from __future__ import annotations

import argparse

from megatron.training.arguments_groups.flag_helpers import add_off_switch

CKPT_FORMATS = ["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"]


def add_checkpointing_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Where and how often to save, what to load, and the on-disk format."""
    g = parser.add_argument_group(title="checkpointing")
    g.add_argument("--save", type=str, default=None, help="Directory to save checkpoints in.")
    g.add_argument("--save-interval", "--persistent-save-interval", type=int, default=None, dest="save_interval",
                   help="Save a checkpoint every this many iterations (needed with --save).")
    g.add_argument("--save-retain-interval", type=int, default=None,
                   help="Keep only checkpoints whose iteration is a multiple of this; delete the others.")
    g.add_argument("--keep-last-checkpoints", type=int, default=None,
                   help="After each save, delete committed checkpoints older than the newest N "
                        "(multiples of --save-retain-interval are kept). Default: keep all.")
    g.add_argument("--no-save-optim", action="store_true", default=None, help="Do not save optimizer state.")
    g.add_argument("--no-save-rng", action="store_true", default=None, help="Do not save RNG state.")
    g.add_argument("--load", type=str, default=None, help="Directory to load a checkpoint from.")
    g.add_argument("--no-load-optim", action="store_true", default=None,
                   help="Do not load optimizer and scheduler state.")
    g.add_argument("--no-load-rng", action="store_true", default=None, help="Do not load RNG state.")
    g.add_argument("--finetune", action="store_true",
                   help="Load model weights only: iteration 0, no optimizer/RNG/scheduler state, fresh sample counts.")
    g.add_argument("--pretrained-checkpoint", type=str, default=None,
                   help="Checkpoint to start a finetune from when --load has none.")
    g.add_argument("--ckpt-step", type=int, default=None, help="Load this iteration instead of the latest one.")
    g.add_argument("--override-ckpt-iteration", type=int, default=None,
                   help="Treat the loaded checkpoint as iteration N (rewinds consumed samples to N * gbs).")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="Take architecture flags from the checkpoint's saved args.")
    g.add_argument("--use-mp-args-from-checkpoint-args", action="store_true",
                   help="Also take tensor/pipeline/expert parallel sizes from the checkpoint's args.")
    add_off_switch(g, "use_tokenizer_model_from_checkpoint_args",
                   help="Do not take the tokenizer model from the checkpoint's args.")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="Exit with an error when --load has no checkpoint instead of starting from scratch.")
    g.add_argument("--ckpt-format", type=str, default="torch_dist", choices=CKPT_FORMATS,
                   help="Format to save in and to expect on load.")
    g.add_argument("--auto-detect-ckpt-format", action="store_true", help="Detect the format of the loaded checkpoint.")
    g.add_argument("--ckpt-megatron-lm-layout", action="store_true",
                   help="Save checkpoints in Megatron-LM's own key layout (torch_dist: layers stacked, its "
                        "common_state; torch: its per-rank names and extra state), model weights only, so that "
                        "Megatron-LM loads them. Loading recognizes Megatron-LM checkpoints without this flag.")
    g.add_argument("--use-dist-ckpt", action="store_true", dest="use_dist_ckpt_deprecated",
                   help="Deprecated no-op: use --ckpt-format.")
    g.add_argument("--dist-ckpt-format", type=str, default=None, dest="dist_ckpt_format_deprecated",
                   help="Deprecated no-op: use --ckpt-format.")
    g.add_argument("--ckpt-convert-format", type=str, default=None, choices=["torch", "torch_dist", "torch_dcp"],
                   help="Load, save in this format under --ckpt-convert-save, and exit.")
    g.add_argument("--ckpt-convert-save", type=str, default=None, help="Output directory of --ckpt-convert-format.")
    g.add_argument("--async-save", action="store_true", help="Write checkpoints in a background process.")
    add_off_switch(g, "ckpt_fully_parallel_save", help="Do not split checkpoint writing across data-parallel ranks.")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true", help="Split checkpoint reading across DP ranks.")
    g.add_argument("--dist-ckpt-strictness", type=str, default="assume_ok_unexpected",
                   choices=["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
                            "raise_all", "return_unexpected", "return_all", "ignore_all"],
                   help="torch_dist loads: assume_ok_unexpected, raise_unexpected and raise_all refuse a "
                        "checkpoint that lacks a tensor of the model or holds one it lacks; the others load what "
                        "fits and print what did not (refused with optimizer loading when the model has more).")
    g.add_argument("--non-persistent-save-interval", type=int, default=None,
                   help="Also save a non-persistent checkpoint every this many iterations (needs "
                        "--non-persistent-ckpt-type); only the newest is kept.")
    g.add_argument("--non-persistent-ckpt-type", type=str, default=None, choices=["global", "local", "in_memory"],
                   help="Kind of non-persistent checkpoint: global (a shared directory), local (each rank's state "
                        "on node-local storage, --non-persistent-local-ckpt-dir) or in_memory (each rank's state "
                        "in host memory, for a restart inside the same process). --load takes it when it is at "
                        "least as new as the persistent checkpoint.")
    g.add_argument("--non-persistent-global-ckpt-dir", type=str, default=None,
                   help="Directory of global non-persistent checkpoints; default <save>/non_persistent.")
    g.add_argument("--non-persistent-local-ckpt-dir", type=str, default=None,
                   help="Node-local directory of local non-persistent checkpoints (one subdirectory per rank); "
                        "needed with --non-persistent-ckpt-type local.")
    g.add_argument("--non-persistent-local-ckpt-algo", type=str, default="fully_parallel",
                   choices=["fully_parallel", "atomic"],
                   help="How local non-persistent checkpoints are written. Both write each rank's complete state "
                        "into one file of its own (Megatron's fully_parallel de-duplication of data-parallel "
                        "replicas is not done: files are larger, what is restored is the same).")
    g.add_argument("--replication", action="store_true", default=False,
                   help="Also keep each rank's local non-persistent checkpoint on its replication partners (see "
                        "--replication-jump), so a lost node's state is restored from a peer.")
    g.add_argument("--replication-jump", type=int, default=None,
                   help="J: a rank's replication partners are the ranks n, n+J, ..., n+(F-1)J of its group "
                        "(nvidia-resiliency-ext's grouping); usually the number of ranks per node. Needed with "
                        "--replication.")
    g.add_argument("--replication-factor", type=int, default=2,
                   help="F: how many ranks (usually nodes) hold a copy of each rank's local checkpoint.")
    g.add_argument("--load-main-params-from-ckpt", action="store_true",
                   help="With --no-load-optim: take the fp32 main params from the checkpoint (torch_dist) "
                        "instead of copying the loaded bf16/fp16 weights; the moments start fresh.")
    add_off_switch(g, "save_tokenizer_assets", help="Do not copy tokenizer files into torch_dist checkpoints.")
    return parser
