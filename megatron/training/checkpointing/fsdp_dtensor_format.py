"""``--ckpt-format fsdp_dtensor``: the checkpoint of --use-megatron-fsdp runs. As in
Megatron-LM it is a plain torch.distributed.checkpoint directory, ``.metadata`` +
``__<rank>_0.distcp`` and no ``metadata.json``; what is inside follows the implementation
the run's --data-parallel-sharding-strategy chose (``megatron/training/megatron_fsdp.py``):

- ``optim_grads_params`` (FSDP2): exactly a torch_dcp checkpoint (``torch_dcp_format``):
  DTensors under ``model.<name>`` and ``optimizer.state.<name>.<state>``, rank 0's
  ``common.pt`` and every rank's ``rng_rank_<r>.pt``; it reshards over data-parallel ranks.
- ``optim``, ``optim_grads``, ``no_shard`` (the distributed optimizer, plain DDP): the
  tensors and objects of a torch_dist checkpoint (``torch_dist_format``: model-space keys,
  ``optimizer.state.<state>.<name>``, the ``common_state`` and ``rng_state/rank_<r>``
  objects) without torch_dist's ``metadata.json`` marker; it reshards as torch_dist does.

Loading needs no flag: a ``.metadata`` without ``metadata.json`` is read as the second kind
when its keys include ``common_state``, else as the first. The key names are this
framework's; Megatron-LM's own fsdp_dtensor checkpoints (other keys, no ``common.pt``) are
refused by the torch_dcp reader, naming the missing file.
"""

from __future__ import annotations

import os
import pickle

from megatron.core.dist_checkpointing import read_metadata
from megatron.training.checkpointing.torch_dist_format import COMMON_KEY, MARKER_FILENAME

FORMAT = "fsdp_dtensor"
DCP_METADATA = ".metadata"


def holds_torch_dist_layout(directory: str) -> bool:
    """A DCP directory without ``metadata.json`` whose keys are torch_dist's: an
    fsdp_dtensor checkpoint of the distributed optimizer or plain DDP."""
    if not os.path.isfile(os.path.join(directory, DCP_METADATA)):
        return False
    if os.path.isfile(os.path.join(directory, MARKER_FILENAME)):
        return False
    try:
        keys = read_metadata(directory).state_dict_metadata
    except (OSError, EOFError, pickle.UnpicklingError):
        return False  # not readable as ours; the torch_dcp reader names what is wrong
    return COMMON_KEY in keys
