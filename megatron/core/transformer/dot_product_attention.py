"""Core attention: softmax(q k^T * scale + mask) v, with interchangeable backends.

Backends (--attention-backend): ``sdpa`` uses torch.nn.functional.scaled_dot_product_attention,
on CUDA with the kernel priority cuDNN, flash, memory-efficient, math
(``fusions/sdpa_backends.py``, logged once); grouped-query attention goes through
``enable_gqa`` so K/V are not repeated in memory, unless only repeating them lets cuDNN
run; ``unfused``
is the explicit reference math with an fp32 softmax, kept as the yardstick every other
path is tested against. ``auto``, ``flash`` and ``fused`` map to sdpa; ``local`` maps to
unfused. The choice is logged once per process.

Mask convention (Megatron's): a bool tensor where True means "masked out".
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import process_groups, tensor_parallel
from megatron.core.fusions.sdpa_backends import repeat_kv_for_cudnn, sdpa_backend_priority
from megatron.core.transformer.context_parallel import ContextParallelAttention, resolve_comm_type
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

logger = logging.getLogger(__name__)

_BACKEND_ALIASES = {"auto": "sdpa", "sdpa": "sdpa", "flash": "sdpa", "fused": "sdpa", "unfused": "unfused", "local": "unfused"}
_LOGGED_BACKENDS: set = set()

# Megatron fills masked scores with -10000 before the softmax; any value far below the
# real scores gives the same probabilities (exactly 0 after exp in fp32).
_MASKED_SCORE = -10000.0


def resolve_attention_backend(requested) -> str:
    """'sdpa' or 'unfused' for a --attention-backend value (str or AttnBackend enum)."""
    name = getattr(requested, "name", requested)
    backend = _BACKEND_ALIASES.get(str(name))
    if backend is None:
        raise ValueError(
            f"--attention-backend {name!r} is not supported: use one of "
            f"{', '.join(sorted(_BACKEND_ALIASES))}"
        )
    if (name, backend) not in _LOGGED_BACKENDS:
        _LOGGED_BACKENDS.add((name, backend))
        logger.info("attention backend: %s (requested %s)", backend, name)
    return backend


def build_attention_mask(
    sq: int,
    sk: int,
    attn_mask_type: AttnMaskType,
    attention_mask: Optional[torch.Tensor],
    window_size,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """Combine causal, sliding-window and explicit masks into one bool mask (True = masked).

    Returns None (attend everywhere) or a tensor broadcastable to [b, 1, sq, sk]. Query i
    sits at absolute position i + (sk - sq). With window (left, right), query i attends
    keys j with i - left <= j <= i + right (right is 0 under a causal mask), the
    flash-attention convention; Hugging Face's ``sliding_window=W`` equals (W - 1, 0).
    """
    if attn_mask_type == AttnMaskType.no_mask:
        attention_mask = None
    mask = attention_mask
    causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
    if causal or window_size is not None:
        q_pos = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        k_pos = torch.arange(sk, device=device).unsqueeze(0)
        structural = torch.zeros(sq, sk, dtype=torch.bool, device=device)
        if causal:
            structural |= k_pos > q_pos
        if window_size is not None:
            left, right = window_size
            if left >= 0:
                structural |= k_pos < q_pos - left
            if right >= 0 and not causal:
                structural |= k_pos > q_pos + right
        structural = structural.view(1, 1, sq, sk)
        mask = structural if mask is None else (mask.to(torch.bool) | structural)
    return mask


class DotProductAttention(torch.nn.Module):
    """Core attention of one layer.

    forward(query [sq, b, np, hn], key [sk, b, ng, hn], value [sk, b, ng, hn],
    attention_mask (None or bool [b or 1, 1, sq, sk], True = masked), attn_mask_type=None)
    -> context [sq, b, np * hn]. np and ng are this rank's heads and query groups; np is a
    multiple of ng, and query head h uses key/value group h // (np / ng).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
    ):
        super().__init__()
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        groups = process_groups.resolve(pg_collection)
        self.tp_group = groups.tp
        self.backend = resolve_attention_backend(config.attention_backend)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        # Layer scaling divides q k^T by layer_number before the (fp32) softmax input is
        # multiplied back by it: the same math, but half-precision scores stay in range.
        self.coeff = float(self.layer_number) if config.apply_query_key_layer_scaling else 1.0
        self.window_size = config.window_size
        self.cp_attention = self._build_context_parallel(config, groups.cp)

    def _build_context_parallel(self, config: TransformerConfig, cp_group):
        """The context-parallel attention of this layer, or None without context parallelism."""
        if process_groups.group_size(cp_group) == 1:
            return None
        comm_type = resolve_comm_type(getattr(config, "cp_comm_type", None), self.layer_number)
        causal = self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        return ContextParallelAttention(
            comm_type, cp_group, causal, self.window_size, self.softmax_scale, self._attend,
            hierarchical_sizes=getattr(config, "hierarchical_context_parallel_sizes", None),
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
    ) -> torch.Tensor:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        if np_ % ng:
            raise ValueError(f"{np_} query heads cannot share {ng} key/value groups: heads must be a multiple")
        dropout_p = self.dropout_p if self.training else 0.0
        if self.cp_attention is not None:
            return self._context_parallel(query, key, value, attention_mask, mask_type, dropout_p)
        only_causal = (
            mask_type == AttnMaskType.causal and attention_mask is None and self.window_size is None and sq == sk
        )
        mask = None if only_causal else build_attention_mask(sq, sk, mask_type, attention_mask, self.window_size, query.device)
        if dropout_p > 0.0:
            # Heads differ per tensor-parallel rank, so dropout draws from the
            # tensor-parallel RNG stream (different per rank, reproducible per seed).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._attend(query, key, value, mask, only_causal, dropout_p)
        else:
            context = self._attend(query, key, value, mask, only_causal, dropout_p)
        return context.reshape(sq, b, np_ * hn)

    def _context_parallel(self, query, key, value, attention_mask, mask_type, dropout_p):
        """This rank's rows of attention over the context-parallel sequence -> [sq, b, np * hn]."""
        if attention_mask is not None or mask_type != self.attn_mask_type:
            raise ValueError(
                "an explicit attention mask (--reset-attention-mask) or a per-call mask type is not supported "
                "with --context-parallel-size > 1: drop --reset-attention-mask or use --context-parallel-size 1"
            )
        sq, b, np_, hn = query.shape
        if dropout_p > 0.0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self.cp_attention(query, key, value, dropout_p)
        else:
            context = self.cp_attention(query, key, value, dropout_p)
        return context.reshape(sq, b, np_ * hn)

    def _attend(self, query, key, value, mask, is_causal, dropout_p):
        """[sq, b, np, hn] x [sk, b, ng, hn] -> [sq, b, np, hn] with the chosen backend."""
        if self.backend == "sdpa":
            return self._sdpa(query, key, value, mask, is_causal, dropout_p)
        return self._unfused(query, key, value, mask, is_causal, dropout_p)

    def _sdpa(self, query, key, value, mask, is_causal, dropout_p):
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        attn_mask = None if mask is None else ~mask  # torch: True = attend
        if repeat_kv_for_cudnn(q, k, v, attn_mask, dropout_p, is_causal):
            repeats = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        with sdpa_backend_priority(q.device):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        return out.permute(2, 0, 1, 3)

    def _unfused(self, query, key, value, mask, is_causal, dropout_p):
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        # Group query heads by their key/value group and broadcast K/V over the group
        # instead of repeating them: q [b, ng, np/ng, sq, hn], k/v [b, ng, 1, sk, hn].
        q = query.permute(1, 2, 0, 3).reshape(b, ng, np_ // ng, sq, hn)
        k = key.permute(1, 2, 0, 3).unsqueeze(2)
        v = value.permute(1, 2, 0, 3).unsqueeze(2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.softmax_scale / self.coeff)
        if self.config.attention_softmax_in_fp32:
            scores = scores.float()
        scores = scores * self.coeff
        if is_causal:
            mask = build_attention_mask(sq, sk, AttnMaskType.causal, None, None, query.device)
        if mask is not None:
            scores = scores.masked_fill(mask.unsqueeze(2), _MASKED_SCORE)  # [b|1, 1, 1, sq, sk]
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        context = torch.matmul(probs, v)  # [b, ng, np/ng, sq, hn]
        return context.reshape(b, np_, sq, hn).permute(2, 0, 1, 3)
