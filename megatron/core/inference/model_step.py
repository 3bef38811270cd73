"""One forward of a (tensor- and pipeline-parallel) model over the next tokens of a batch.

Every rank of the model-parallel group calls ``ModelStep`` with the same tokens:
the first pipeline stage embeds them, each later stage receives the previous stage's
hidden states [s, b, h], and the last stage returns the logits, gathered over the
tensor-parallel group. ``share_from_last_stage`` then gives the last stage's decision
(the chosen tokens, log-probs) to every rank, so that all ranks feed the same tokens next.
Sequence parallelism and context parallelism are not used for generation (one new token
cannot be split along the sequence).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron.core import process_groups, tensor_parallel
from megatron.core.pipeline_parallel.p2p_communication import P2PConfig, recv_forward, send_forward


def _group_size(group) -> int:
    return process_groups.group_size(group) if dist.is_available() and dist.is_initialized() else 1


class ModelStep:
    """forward(tokens [b, s] int64, positions [b, s] int64, inference_context) ->
    fp32 logits [b, s, V] on the last pipeline stage (the whole vocabulary, padding
    included), None on the other stages."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        if config.sequence_parallel:
            raise ValueError("generation does not use --sequence-parallel: build the model for inference without it")
        groups = model.pg_collection
        if _group_size(groups.cp) > 1:
            raise ValueError("generation does not support --context-parallel-size > 1: serve with --context-parallel-size 1")
        self.model = model
        self.tp_group = groups.tp
        self.pp_group = groups.pp
        self.tp_size = _group_size(groups.tp)
        self.pp_size = _group_size(groups.pp)
        self.pp_rank = process_groups.group_rank(groups.pp) if self.pp_size > 1 else 0
        self.is_first_stage = self.pp_rank == 0
        self.is_last_stage = self.pp_rank == self.pp_size - 1
        self.hidden_size = config.hidden_size
        self.parallel_output = getattr(model, "parallel_output", False)
        self.model_parallel = self.tp_size > 1 or self.pp_size > 1

    def _p2p(self, batch: int, seq: int, device: torch.device) -> P2PConfig:
        dtype = next(self.model.parameters()).dtype
        return P2PConfig(self.pp_group, (seq, batch, self.hidden_size), dtype, device)

    def run_stage(self, tokens: torch.Tensor, forward: Callable[[], Any]) -> Any:
        """``forward()`` on this pipeline stage of a forward over ``tokens`` [b, s]: the
        previous stage's hidden states are received first and this stage's output is sent
        on; returns the output on the last stage, None on the others."""
        batch, seq = tokens.shape
        if not self.is_first_stage:
            self.model.set_input_tensor(recv_forward(self._p2p(batch, seq, tokens.device)))
        output = forward()
        if not self.is_last_stage:
            send_forward(output, self._p2p(batch, seq, tokens.device))
            return None
        return output

    def full_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """The last stage's logits over the whole vocabulary (gathered over the
        tensor-parallel group when the model keeps them split)."""
        if self.parallel_output and self.tp_size > 1:
            return tensor_parallel.gather_from_tensor_model_parallel_region(logits, self.tp_group)
        return logits

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, inference_context) -> Optional[torch.Tensor]:
        output = self.run_stage(tokens, lambda: self.model(tokens, positions, None, inference_context=inference_context))
        return None if output is None else self.full_vocabulary(output).float()

    def share_from_last_stage(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` as decided by the last stage's first tensor-parallel rank, on every rank
        (in place; same shape and dtype on every rank)."""
        if self.tp_size > 1 and self.is_last_stage:
            dist.broadcast(values, dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        if self.pp_size > 1:
            dist.broadcast(values, dist.get_global_rank(self.pp_group, self.pp_size - 1), group=self.pp_group)
        return values

    def share_from_first_rank(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` as the first stage's first tensor-parallel rank (the one that talks to
        clients) has them, on every rank (in place)."""
        if self.tp_size > 1 and self.is_first_stage:
            dist.broadcast(values, dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        if self.pp_size > 1:
            dist.broadcast(values, dist.get_global_rank(self.pp_group, 0), group=self.pp_group)
        return values
