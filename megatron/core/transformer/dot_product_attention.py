"""Core attention: softmax(q k^T * scale + mask) v, with interchangeable backends.

Backends (--attention-backend): ``sdpa`` uses torch.nn.functional.scaled_dot_product_attention,
on CUDA with the kernel priority cuDNN, flash, memory-efficient, math
(``fusions/sdpa_backends.py``, logged once); grouped-query attention goes through
``enable_gqa`` so K/V are not repeated in memory, unless only repeating them lets cuDNN
run; ``unfused``
is the explicit reference math with an fp32 softmax, kept as the yardstick every other
path is tested against. ``auto``, ``flash`` and ``fused`` map to sdpa; ``local`` maps to
unfused. The choice is logged once per process.

Softmax (--softmax-type): ``off-by-one`` divides by 1 + sum(exp(scores)), as if every row
had one more key with logit 0 and a zero value; ``learnable`` gives that extra logit per
head as the parameter ``softmax_offset`` (attention sinks, split over tensor-parallel
ranks like the heads). The unfused path appends the extra logit to the scores; sdpa
appends a zero key and value and carries the logit (and the mask) in a float bias, which
is exact but materializes a [b, np, sq, sk + 1] bias.

Mask convention (Megatron's): a bool tensor where True means "masked out".
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import process_groups, tensor_parallel
from megatron.core.fusions.sdpa_backends import repeat_kv_for_cudnn, sdpa_attn_mask, sdpa_backend_priority
from megatron.core.tensor_parallel.layers import _param_device, set_tensor_model_parallel_attributes
from megatron.core.transformer.context_parallel import ContextParallelAttention, resolve_comm_type
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.sliding_window import layer_window_size
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
    query_offset: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Combine causal, sliding-window and explicit masks into one bool mask (True = masked).

    Returns None (attend everywhere) or a tensor broadcastable to [b, 1, sq, sk]. Query i
    sits at absolute position i + (sk - sq), or at i + ``query_offset`` (a one-element
    device tensor: a fixed-shape KV cache read whole, the newest keys not at its end). With
    window (left, right), query i attends
    keys j with i - left <= j <= i + right (right is 0 under a causal mask), the
    flash-attention convention; Hugging Face's ``sliding_window=W`` equals (W - 1, 0).
    """
    if attn_mask_type == AttnMaskType.no_mask:
        attention_mask = None
    mask = attention_mask
    causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
    if causal or window_size is not None:
        q_pos = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq if query_offset is None else query_offset)
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
        self.window_size = layer_window_size(config, self.layer_number)
        self.cp_attention = self._build_context_parallel(config, groups.cp)
        self._build_softmax_offset(config, groups.tp)

    def _build_softmax_offset(self, config: TransformerConfig, tp_group) -> None:
        """``softmax_offset`` [heads on this rank]: None (vanilla), zeros not saved in
        checkpoints (off-by-one), or a parameter split over tensor-parallel ranks (learnable)."""
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type == "vanilla":
            self.softmax_offset = None
            return
        tp = process_groups.group_size(tp_group)
        heads = config.num_attention_heads // tp
        device = _param_device(config)
        if softmax_type == "off-by-one":
            self.register_buffer(
                "softmax_offset", torch.zeros(heads, device=device, dtype=config.params_dtype), persistent=False
            )
            return
        offset = torch.nn.Parameter(torch.empty(heads, device=device, dtype=config.params_dtype))
        if config.perform_initialization and device.type != "meta":
            self._init_softmax_offset(offset, config, tp_group)
        set_tensor_model_parallel_attributes(offset, True, 0, 1)
        self.softmax_offset = offset

    @staticmethod
    def _init_softmax_offset(offset: torch.nn.Parameter, config: TransformerConfig, tp_group) -> None:
        """config.init_method, as Megatron initializes the sink logits; with
        --use-cpu-initialization the full vector is drawn and split, so the model does not
        depend on the tensor-parallel size."""
        with torch.no_grad():
            if config.use_cpu_initialization:
                full = torch.empty(config.num_attention_heads, dtype=torch.float32)
                config.init_method(full)
                rank = process_groups.group_rank(tp_group)
                offset.copy_(full.view(-1, offset.numel())[rank])
            else:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    config.init_method(offset)

    def _build_context_parallel(self, config: TransformerConfig, cp_group):
        """The context-parallel attention of this layer, or None without context parallelism."""
        if process_groups.group_size(cp_group) == 1:
            return None
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"--softmax-type {config.softmax_type} is not supported with --context-parallel-size > 1: "
                "use --context-parallel-size 1 or --softmax-type vanilla"
            )
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
        query_offset: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        if np_ % ng:
            raise ValueError(f"{np_} query heads cannot share {ng} key/value groups: heads must be a multiple")
        dropout_p = self.dropout_p if self.training else 0.0
        if self.cp_attention is not None:
            if query_offset is not None:
                raise ValueError("a query offset (generation from a fixed-shape KV cache) does not combine with "
                                 "--context-parallel-size > 1")
            return self._context_parallel(query, key, value, attention_mask, mask_type, dropout_p)
        only_causal = (
            mask_type == AttnMaskType.causal and attention_mask is None and self.window_size is None and sq == sk
            and query_offset is None
        )
        mask = None if only_causal else build_attention_mask(sq, sk, mask_type, attention_mask, self.window_size,
                                                             query.device, query_offset)
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
        if self.softmax_offset is not None:
            return self._sdpa_with_sink(q, k, v, mask, is_causal, dropout_p)
        attn_mask = None if mask is None else sdpa_attn_mask(mask, q.dtype)
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

    def _sdpa_with_sink(self, q, k, v, mask, is_causal, dropout_p):
        """sdpa over the keys plus one zero key/value whose logit is the per-head offset:
        the extra column of the float bias holds the offset (q . 0 = 0), the others 0 or
        -inf where masked. No row is fully masked, so no NaN."""
        b, np_, sq, hn = q.shape
        ng, sk = k.shape[1], k.shape[2]
        if is_causal:
            mask = build_attention_mask(sq, sk, AttnMaskType.causal, None, None, q.device)
        bias = torch.zeros(1, 1, sq, sk, dtype=q.dtype, device=q.device)
        if mask is not None:
            bias = bias.masked_fill(mask, float("-inf"))
        bias = bias.expand(bias.shape[0], np_, sq, sk)
        sink = self.softmax_offset.to(q.dtype).view(1, np_, 1, 1).expand(bias.shape[0], np_, sq, 1)
        bias = torch.cat([bias, sink], dim=-1)
        zero = k.new_zeros(b, ng, 1, hn)
        k = torch.cat([k, zero], dim=2)
        v = torch.cat([v, zero], dim=2)
        with sdpa_backend_priority(q.device):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.softmax_scale, enable_gqa=np_ != ng
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
        probs = self._softmax(scores).to(value.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        context = torch.matmul(probs, v)  # [b, ng, np/ng, sq, hn]
        return context.reshape(b, np_, sq, hn).permute(2, 0, 1, 3)

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax over the last dim of scores [b, ng, np/ng, sq, sk], with the extra
        per-head logit of the off-by-one / learnable softmax as a dropped last column."""
        if self.softmax_offset is None:
            return torch.softmax(scores, dim=-1)
        b, ng, per_group, sq, _ = scores.shape
        sink = self.softmax_offset.to(scores.dtype).view(1, ng, per_group, 1, 1).expand(b, ng, per_group, sq, 1)
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
