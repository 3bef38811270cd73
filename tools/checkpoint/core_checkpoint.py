"""A Megatron checkpoint directory (``--save`` root) as the converter sees it: its format,
iteration, saved run arguments and parallel layout; and the argument namespace a
conversion worker runs with."""

from __future__ import annotations

import copy
import glob
import logging
import os
import warnings
from dataclasses import dataclass


from megatron.training.checkpointing import directory as layout
from megatron.training.checkpointing import megatron_lm, torch_dist_format, torch_format
# The attribute in which an import records the Hugging Face architecture it read (saver_core).
from megatron.training.checkpointing.checkpoint_args import IMPORTED_ARCHITECTURE
from megatron.training.checkpointing.directory import CheckpointError

from workers import ConversionError


@dataclass
class CoreCheckpoint:
    root: str
    ckpt_format: str  # "torch_dist" or "torch"
    iteration: int
    args: object  # the saving run's argparse Namespace

    @property
    def layout(self) -> tuple:
        """(TP, PP, EP) of the saving run."""
        return tuple(getattr(self.args, name, 1) or 1 for name in
                     ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))

    def describe(self) -> str:
        tp, pp, ep = self.layout
        return f"{self.root} ({self.ckpt_format}, TP={tp} PP={pp} EP={ep}, iteration {self.iteration})"


def open_core_checkpoint(root: str) -> CoreCheckpoint:
    """Read the tracker and the saved arguments of the checkpoint under ``root``."""
    if not os.path.isdir(root):
        raise ConversionError(f"--load-dir {root}: no such directory")
    try:
        iteration, release = layout.read_tracker(root)
    except CheckpointError as error:
        raise ConversionError(str(error)) from None
    if iteration is None:
        raise ConversionError(f"--load-dir {root}: no {layout.TRACKER_FILENAME}; point --load-dir at a --save "
                              "directory of a training run")
    directory = layout.iteration_dir(root, iteration, release)
    if megatron_lm.is_megatron_checkpoint(directory):
        # Written by Megatron-LM (either format): the workers' load reads it in any layout.
        ckpt_format = torch_dist_format.FORMAT if megatron_lm.torch_dist.is_megatron_torch_dist(directory) \
            else torch_format.FORMAT
        return CoreCheckpoint(root, ckpt_format, iteration, megatron_lm.read_saved_args(directory))
    if torch_dist_format.is_torch_dist_checkpoint(directory):
        with warnings.catch_warnings():
            # Read from this single process on purpose; torch warns that no group exists.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            common = torch_dist_format.read_common(directory, None)
        return CoreCheckpoint(root, torch_dist_format.FORMAT, int(common.get("iteration", iteration)), common["args"])
    files = sorted(glob.glob(os.path.join(directory, "mp_rank_00*", torch_format.MODEL_FILENAME)))
    if torch_format.is_torch_checkpoint(directory) and files:
        state = torch_format.load_own_file(files[0])
        return CoreCheckpoint(root, torch_format.FORMAT, int(state.get("iteration", iteration)), state["args"])
    raise ConversionError(f"{directory} is neither a torch_dist checkpoint (metadata.json) nor a torch "
                          "checkpoint (mp_rank_*/model_optim_rng.pt)")


# Derived copies of other flags that validation writes back; passing them again as flags
# would conflict with the originals.
_DERIVED_MIRRORS = ("encoder_num_layers", "encoder_seq_length")


def _as_command_line(saved_args):
    """A namespace as the command line would give it: the parser's flags with the saved
    run's values (derived-only attributes dropped, validation derives them again)."""
    from megatron.training.arguments import parse_args

    args = parse_args(None, args=[])
    for name in vars(args):
        if hasattr(saved_args, name) and name not in _DERIVED_MIRRORS:
            setattr(args, name, copy.deepcopy(getattr(saved_args, name)))
    if hasattr(saved_args, IMPORTED_ARCHITECTURE):
        setattr(args, IMPORTED_ARCHITECTURE, getattr(saved_args, IMPORTED_ARCHITECTURE))
    if args.weight_decay_incr_style == "constant":
        # Derived from --weight-decay for a constant style; as flags they need another style.
        args.start_weight_decay = args.end_weight_decay = None
    return args


def worker_args(saved_args, *, load: str, save: str, ckpt_format: str, tp: int, pp: int, ep: int):
    """The saved run's arguments set up for a conversion run of TP x PP x EP ranks that loads
    only the model and saves only the model (optimizer and RNG states are dropped)."""
    args = _as_command_line(saved_args)
    world = tp * pp * ep
    overrides = dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=None, context_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        num_virtual_stages_per_pipeline_rank=None,
        world_size=world, rank=0, load=load, save=save, pretrained_checkpoint=None, ckpt_step=None,
        finetune=False, exit_on_missing_checkpoint=True, override_ckpt_iteration=None,
        no_load_optim=True, no_load_rng=True, no_save_optim=True, no_save_rng=True, async_save=False,
        ckpt_format=ckpt_format, use_cpu_initialization=True, distributed_backend="gloo",
        use_distributed_optimizer=False, keep_last_checkpoints=None, save_retain_interval=None,
        logging_level=logging.WARNING,
    )
    if pp != (getattr(saved_args, "pipeline_model_parallel_size", 1) or 1):
        # An uneven split of the saving run's stages does not carry over to another PP size.
        overrides.update(decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
                         account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False)
    for name, value in overrides.items():
        setattr(args, name, value)
    # The batch only has to be valid for the data-parallel size of the conversion run
    # (EP ranks are data-parallel ranks for the dense part).
    dp = ep
    if args.global_batch_size is None or args.global_batch_size % (args.micro_batch_size * dp):
        args.micro_batch_size, args.global_batch_size = 1, dp
    args.rampup_batch_size = None
    args.save_interval = args.save_interval or 1
    padded = getattr(saved_args, "padded_vocab_size", None)
    if padded is not None and padded % tp:
        raise ConversionError(
            f"the checkpoint's padded vocabulary ({padded} rows) does not split over "
            f"--target-tensor-parallel-size {tp}; choose a tensor-parallel size that divides {padded}")
    return args
