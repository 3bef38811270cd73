"""Multi-token prediction (DeepSeek-V3 MTP): extra depths after the decoder that predict
the tokens two, three, ... positions ahead.

Depth k (1-based) takes the previous depth's hidden states h (the decoder's output for
k = 1) and the embedding of the input tokens shifted left by k. It normalizes both
(``hnorm``, ``enorm``), projects their concatenation [embedding; hidden] back to the
hidden size (``eh_proj``, column-parallel with the result gathered), runs one transformer
layer and a final norm. The shared output layer turns the result into logits for the
labels shifted left by k, i.e. token i + k + 1 at position i. Shifting drops the last k
positions of each sequence: their loss mask is zero, as in Megatron-Core.

The training objective gains ``mtp_loss_scaling_factor / mtp_num_layers`` times the sum
of the depths' (masked mean) losses. That term enters the backward pass through
``MoEAuxLossAutoScaler`` attached to the main hidden states, so what the model returns
(the LM per-token loss) is unchanged; each depth's unscaled loss is recorded for the
iteration log (``mtp_1 loss``, ...). Parameter names follow Megatron-Core:
``mtp.layers.{k-1}.{enorm,hnorm,eh_proj,transformer_layer,final_layernorm}``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from megatron.core import process_groups, tensor_parallel
from megatron.core.transformer.init_rng import initialization_stream
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.torch_norm import build_norm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer


def roll_left(tensor: torch.Tensor) -> torch.Tensor:
    """Shift [b, s] left by one along s; the freed last position becomes 0."""
    rolled = torch.roll(tensor, shifts=-1, dims=-1)
    rolled[..., -1] = 0
    return rolled


class MultiTokenPredictionLayer(torch.nn.Module):
    """One MTP depth: forward(embedded [s, b, h], hidden_states [s, b, h], attention_mask,
    rotary_pos_emb) -> [s, b, h] (after ``final_layernorm``, ready for the output layer)."""

    def __init__(self, config: TransformerConfig, layer_number: int, pg_collection: process_groups.ProcessGroups):
        super().__init__()
        self.enorm = build_norm(config, config.hidden_size)
        self.hnorm = build_norm(config, config.hidden_size)
        self.eh_proj = tensor_parallel.ColumnParallelLinear(
            2 * config.hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=True,
            tp_group=pg_collection.tp,
        )
        self.transformer_layer = TransformerLayer(config, layer_number=layer_number, pg_collection=pg_collection)
        self.final_layernorm = build_norm(config, config.hidden_size)

    def forward(self, embedded, hidden_states, attention_mask=None, rotary_pos_emb=None):
        combined = torch.cat((self.enorm(embedded), self.hnorm(hidden_states)), dim=-1)
        projected, _ = self.eh_proj(combined)
        out, _ = self.transformer_layer(projected, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        return self.final_layernorm(out)


class _DepthLossTracker:
    """Per-depth MTP losses of the micro-batches run since the last ``pop`` (detached sums
    of the per-micro-batch mean losses), for the iteration log."""

    def __init__(self):
        self.values: Dict[int, torch.Tensor] = {}

    def add(self, depth: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.values[depth] = self.values[depth] + loss if depth in self.values else loss

    def pop(self, num_depths: int, device=None) -> torch.Tensor:
        """The accumulated losses as a [num_depths] tensor (zeros where nothing ran here); clears."""
        out = torch.zeros(num_depths, dtype=torch.float32, device=device)
        for depth, value in self.values.items():
            if depth < num_depths:
                out[depth] = value.to(out.device)
        self.values.clear()
        return out


_TRACKER = _DepthLossTracker()


def mtp_loss_tracker() -> _DepthLossTracker:
    """The process-wide tracker the MTP block records into while training."""
    return _TRACKER


def check_mtp_config(config: TransformerConfig, position_embedding_type: str, pg_collection) -> None:
    """Raise ValueError for settings the MTP block does not support."""
    if config.mtp_num_layers < 0:
        raise ValueError(f"--mtp-num-layers must be >= 1 (or unset), got {config.mtp_num_layers}")
    if position_embedding_type == "learned_absolute":
        raise ValueError(
            "--mtp-num-layers needs --position-embedding-type rope or none (the MTP depths see shifted tokens, "
            "which learned absolute positions would mislabel), got learned_absolute"
        )
    unsupported = {
        "--pipeline-model-parallel-size > 1": pg_collection.size("pp") > 1,
        "--context-parallel-size > 1": pg_collection.size("cp") > 1,
        "--sequence-parallel": bool(config.sequence_parallel),
    }
    for flag, used in unsupported.items():
        if used:
            raise ValueError(f"--mtp-num-layers is not supported with {flag} yet: drop one of them")


class MultiTokenPredictionBlock(torch.nn.Module):
    """The ``mtp`` module of GPTModel: ``layers`` holds the ``mtp_num_layers`` depths.

    ``forward`` returns the main hidden states with the scaled MTP loss attached for the
    backward pass (see the module docstring) and records each depth's loss.
    """

    def __init__(self, config: TransformerConfig, pg_collection: process_groups.ProcessGroups):
        super().__init__()
        self.config = config
        self.tp_group = pg_collection.tp
        layers = []
        for k in range(config.mtp_num_layers):
            # Numbered after the decoder's layers, as Megatron-Core numbers them.
            with initialization_stream(f"mtp{k + 1}"):
                layers.append(MultiTokenPredictionLayer(config, config.num_layers + k + 1, pg_collection))
        self.layers = torch.nn.ModuleList(layers)

    def depth_losses(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        labels: torch.Tensor,
        embed: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
        loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        attention_mask=None,
        rotary_pos_emb=None,
    ) -> List[torch.Tensor]:
        """Per-depth per-token losses [b, s] (fp32, unmasked) for labels shifted by 1, 2, ...

        ``embed(input_ids, position_ids)`` is the shared embedding ([s, b, h]);
        ``loss_of(hidden [s, b, h], labels [b, s])`` the shared output layer's per-token loss.
        """
        losses = []
        for layer in self.layers:
            input_ids, labels = roll_left(input_ids), roll_left(labels)
            hidden_states = layer(embed(input_ids, position_ids), hidden_states, attention_mask, rotary_pos_emb)
            losses.append(loss_of(hidden_states, labels))
        return losses

    def attach(self, main_hidden: torch.Tensor, losses: List[torch.Tensor], loss_mask: torch.Tensor) -> torch.Tensor:
        """Record each depth's masked loss and attach their scaled sum to ``main_hidden``."""
        scale = self.config.mtp_loss_scaling_factor / len(losses)
        total = main_hidden.new_zeros((), dtype=torch.float32)
        mask = loss_mask.float()
        for depth, loss in enumerate(losses):
            mask = roll_left(mask)
            loss_sum = torch.sum(loss * mask)
            num_tokens = mask.sum().clamp(min=1)
            mtp_loss_tracker().add(depth, loss_sum / num_tokens)
            # With per-token loss the schedule normalises summed losses over the whole batch.
            term = loss_sum if self.config.calculate_per_token_loss else loss_sum / num_tokens
            total = total + scale * term
        return MoEAuxLossAutoScaler.apply(main_hidden, total)
