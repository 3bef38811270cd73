"""The Mamba-2 mixer: in-projection, depthwise causal conv1d, SSD scan, gated RMSNorm,
out-projection. Parameter names and layouts are Megatron-Core's (and Hugging Face
``Mamba2Mixer``'s), so checkpoints map one to one:

  in_proj.weight   [2*d_inner + 2*G*N + H, hidden]   rows [z ; x ; B ; C ; dt]
  conv1d.weight    [d_inner + 2*G*N, 1, d_conv]      channels [x ; B ; C]
  conv1d.bias      [d_inner + 2*G*N]
  dt_bias, A_log, D  [H]
  norm.weight      [d_inner]                         gated RMSNorm, one norm per group
  out_proj.weight  [hidden, d_inner]

(H heads of P channels, d_inner = H*P, G groups, N state dim.)

Tensor parallelism splits heads and groups: rank r holds heads [r*H/tp, (r+1)*H/tp) and
groups [r*G/tp, (r+1)*G/tp), i.e. its block of each of z, x, B, C, dt. The in-projection
is column parallel and the out-projection row parallel (with sequence parallelism, the
sequence is all-gathered before the one and reduce-scattered after the other); everything
in between is local to the rank (context parallelism deals the rank's heads out further
for the conv and the scan: ``mamba_context_parallel``). A fused weight is therefore a
concatenation of separately split parts: it carries ``partition_sizes`` (the local part
sizes) so checkpoints store the TP=1 layout whatever the tensor-parallel size. Weights are drawn full and then sliced,
so every tensor-parallel size starts from the same model.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parameter import Parameter

from megatron.core import process_groups, tensor_parallel
from megatron.core.fusions.fused_norms import fused_gated_rms_norm
from megatron.core.process_groups import group_rank, group_size
from megatron.core.ssm.causal_conv1d import causal_conv1d
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.ssm.mamba_context_parallel import HeadShare, MambaContextParallel
from megatron.core.ssm.mamba_recurrence import (
    conv_state_of,
    conv_step,
    final_ssm_state,
    output_from_initial_state,
    ssm_step,
)
from megatron.core.ssm.ssd import ssd_scan
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig


def _rank_block(full: torch.Tensor, sizes: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """Concatenation of this rank's block of each dim-0 part of ``full`` (parts ``sizes``)."""
    parts = torch.split(full, list(sizes), dim=0)
    return torch.cat([p.chunk(world, dim=0)[rank] for p in parts], dim=0)


def _mark_split(param: torch.Tensor, local_sizes: Optional[List[int]] = None) -> None:
    set_tensor_model_parallel_attributes(param, True, 0, 1)
    if local_sizes is not None and len(local_sizes) > 1:
        setattr(param, "partition_sizes", tuple(local_sizes))


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """weight * rmsnorm(y * silu(z)) per group (``fused_norms.gated_rms_norm_reference``),
    compiled on CUDA."""
    return fused_gated_rms_norm(y, z, weight, groups, eps)


class _DepthwiseConv1d(torch.nn.Module):
    """Holds ``weight`` [channels, 1, k] and ``bias`` [channels] (nn.Conv1d's names)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = Parameter(weight)
        self.bias = Parameter(bias)


class _GatedNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = Parameter(weight)


class MambaMixer(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h], inference_context=None) -> (output [s(/tp), b, h], None).

    The output is not yet added to the residual (the layer does that). During generation
    ``inference_context`` (``megatron.core.inference.contexts``) holds this layer's recurrent
    state of each sequence under (``layer_number``, sequence) (``mamba_recurrence``)."""

    def __init__(
        self,
        config: TransformerConfig,
        mamba_config: MambaConfig,
        pg_collection: Optional[process_groups.ProcessGroups] = None,
        layer_number: int = 1,
    ):
        super().__init__()
        self.config, self.mamba_config = config, mamba_config
        self.layer_number = layer_number  # names this layer's state in an inference context
        groups = process_groups.resolve(pg_collection)
        self.tp_group = groups.tp
        tp, rank = group_size(self.tp_group), group_rank(self.tp_group)
        mamba_config.validate(config.hidden_size, tp)
        hidden = config.hidden_size
        self.d_inner = mamba_config.inner_size(hidden)
        self.nheads = mamba_config.num_heads(hidden)
        self.headdim, self.ngroups, self.d_state = mamba_config.mamba_head_dim, mamba_config.mamba_num_groups, mamba_config.mamba_state_dim
        self.nheads_local, self.ngroups_local = self.nheads // tp, self.ngroups // tp
        self.d_inner_local = self.d_inner // tp
        bc = self.ngroups * self.d_state
        proj_sizes = [self.d_inner, self.d_inner, bc, bc, self.nheads]
        conv_sizes = [self.d_inner, bc, bc]
        self.conv_dim_local = sum(conv_sizes) // tp

        self.in_proj = tensor_parallel.ColumnParallelLinear(
            hidden, sum(proj_sizes), config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_bias_add=True, tp_group=self.tp_group,
        )
        full = self._draw_full_params(sum(proj_sizes), sum(conv_sizes))
        dtype, device = config.params_dtype, self.in_proj.weight.device
        with torch.no_grad():
            self.in_proj.weight.copy_(_rank_block(full["in_proj"], proj_sizes, rank, tp))
        setattr(self.in_proj.weight, "partition_sizes", tuple(s // tp for s in proj_sizes))

        def local(name, sizes):
            return _rank_block(full[name], sizes, rank, tp).to(device=device, dtype=dtype)

        self.conv1d = _DepthwiseConv1d(local("conv_weight", conv_sizes), local("conv_bias", conv_sizes))
        self.dt_bias = Parameter(local("dt_bias", [self.nheads]))
        self.A_log = Parameter(local("A_log", [self.nheads]))
        self.D = Parameter(local("D", [self.nheads]))
        self.norm = _GatedNorm(torch.ones(self.d_inner_local, device=device, dtype=dtype))
        conv_local = [s // tp for s in conv_sizes]
        for param, sizes in ((self.conv1d.weight, conv_local), (self.conv1d.bias, conv_local), (self.dt_bias, None),
                             (self.A_log, None), (self.D, None), (self.norm.weight, None)):
            _mark_split(param, sizes)
        for param in (self.dt_bias, self.A_log, self.D):
            # Megatron keeps these out of weight decay: they are not weights of a linear map.
            setattr(param, "_no_weight_decay", True)

        self.out_proj = tensor_parallel.RowParallelLinear(
            self.d_inner, hidden, config=config, init_method=config.output_layer_init_method, bias=False,
            input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group,
        )
        self.context_parallel = None
        if group_size(groups.cp) > 1:
            self.context_parallel = MambaContextParallel(groups.cp, self.nheads_local, self.ngroups_local,
                                                         self.headdim, self.d_state)

    def _draw_full_params(self, proj_rows: int, conv_dim: int) -> dict:
        """The full (TP=1) initial values, drawn in a fixed order from the CPU generator."""
        cfg, k = self.mamba_config, self.mamba_config.d_conv
        in_proj = torch.empty(proj_rows, self.config.hidden_size)
        self.config.init_method(in_proj)
        # nn.Conv1d's default init: uniform(+-1/sqrt(fan_in)), fan_in = k for a depthwise conv.
        bound = 1.0 / math.sqrt(k)
        conv_weight = torch.empty(conv_dim, 1, k).uniform_(-bound, bound)
        conv_bias = torch.empty(conv_dim).uniform_(-bound, bound)
        # dt log-uniform in [dt_min, dt_max] (floored); dt_bias is its softplus inverse.
        log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(self.nheads) * (log_hi - log_lo) + log_lo).clamp(min=cfg.dt_init_floor)
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        A = torch.empty(self.nheads).uniform_(*cfg.A_init_range)
        return {"in_proj": in_proj, "conv_weight": conv_weight, "conv_bias": conv_bias, "dt_bias": dt_bias,
                "A_log": torch.log(A), "D": torch.ones(self.nheads)}

    def _split_projection(self, zxbcdt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bc = self.ngroups_local * self.d_state
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner_local, self.d_inner_local + 2 * bc, self.nheads_local], dim=-1)
        return z, xbc, dt

    def _whole_share(self) -> HeadShare:
        """This tensor-parallel rank's heads and the parameters they use."""
        return HeadShare(self.nheads_local, self.ngroups_local, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                         self.dt_bias, self.A_log, self.D)

    def _dt_and_A(self, dt: torch.Tensor, share: Optional[HeadShare] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Raw dt [..., h] -> (softplus(dt + dt_bias) within --dt limits, A = -exp(A_log)), fp32."""
        # the decode step passes no share: its parameters are this rank's whole ones
        dt_bias, A_log = (share.dt_bias, share.A_log) if share else (self.dt_bias, self.A_log)
        dt = F.softplus(dt.float() + dt_bias.float())
        lo, hi = self.mamba_config.dt_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = dt.clamp(min=lo, max=hi)
        return dt, -torch.exp(A_log.float())

    def _split_xbc(self, xbc: torch.Tensor, share: Optional[HeadShare] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., conv_dim] -> x [..., h, p], B and C [..., g, n] (views, the share's heads)."""
        heads, groups = (share.nheads, share.ngroups) if share else (self.nheads_local, self.ngroups_local)
        bc = groups * self.d_state
        x, B, C = torch.split(xbc, [heads * self.headdim, bc, bc], dim=-1)
        lead = xbc.shape[:-1]
        return (x.reshape(*lead, heads, self.headdim), B.reshape(*lead, groups, self.d_state),
                C.reshape(*lead, groups, self.d_state))

    def _conv_and_scan(self, xbc: torch.Tensor, dt: torch.Tensor, share: HeadShare) -> torch.Tensor:
        """xbc [b, s, the share's conv channels], raw dt [b, s, its heads] -> y [b, s, its heads x
        head dim] (training, scoring)."""
        b, s, _ = xbc.shape
        xbc = causal_conv1d(xbc, share.conv_weight, share.conv_bias, activation="silu")
        x, B, C = self._split_xbc(xbc, share)
        dt, A = self._dt_and_A(dt, share)
        return ssd_scan(x, dt, A, B, C, self.mamba_config.chunk_size, share.D).reshape(b, s, share.nheads * self.headdim)

    def _scan_from_state(self, xbc: torch.Tensor, dt: torch.Tensor, state):
        """Several tokens after ``state`` ((conv, SSM) or None for the start of the sequences)
        -> (y [b, s, d_inner/tp], the state after them)."""
        b, s, _ = xbc.shape
        conv_in = xbc if state is None else torch.cat([state[0].transpose(1, 2).to(xbc.dtype), xbc], dim=1)
        conv_out = causal_conv1d(conv_in, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x, B, C = self._split_xbc(conv_out[:, conv_in.shape[1] - s:])
        dt, A = self._dt_and_A(dt)
        y = ssd_scan(x, dt, A, B, C, self.mamba_config.chunk_size, self.D)
        ssm_state = final_ssm_state(x, dt, A, B)
        if state is not None:
            log_decay = torch.cumsum(dt * A, dim=1)  # [b, s, h]
            y = (y.float() + output_from_initial_state(state[1], C, log_decay)).to(y.dtype)
            ssm_state = ssm_state + torch.exp(log_decay[:, -1])[..., None, None] * state[1]
        return y.reshape(b, s, self.d_inner_local), (conv_state_of(conv_in, self.mamba_config.d_conv), ssm_state)

    def _step(self, xbc: torch.Tensor, dt: torch.Tensor, state) -> torch.Tensor:
        """One token per sequence, xbc [b, conv_dim], raw dt [b, h]: advances ``state`` in
        place -> y [b, 1, d_inner/tp]."""
        conv_state, ssm_state = state
        x, B, C = self._split_xbc(conv_step(conv_state, xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias))
        dt, A = self._dt_and_A(dt)
        y = ssm_step(ssm_state, x, dt, A, B, C, self.D)
        return y.reshape(xbc.shape[0], 1, self.d_inner_local).to(xbc.dtype)

    def _step_many(self, xbc: torch.Tensor, dt: torch.Tensor, states) -> torch.Tensor:
        """One token for each of k runs (xbc [b, k, conv_dim], raw dt [b, k, h]; one state of
        batch b per run, b = 1 when k > 1): one batched step -> y [b, k, d_inner/tp]."""
        b, k, _ = xbc.shape
        if k == 1:
            return self._step(xbc[:, 0], dt[:, 0], states[0])
        # Packed decode tokens of several sequences (continuous batching): their states are
        # stacked for one step and written back.
        conv = torch.cat([state[0] for state in states])
        ssm = torch.cat([state[1] for state in states])
        y = self._step(xbc.transpose(0, 1).reshape(k * b, -1), dt.transpose(0, 1).reshape(k * b, -1), (conv, ssm))
        for i, (conv_i, ssm_i) in enumerate(states):
            conv_i.copy_(conv[i * b:(i + 1) * b])
            ssm_i.copy_(ssm[i * b:(i + 1) * b])
        return y.reshape(k, b, -1).transpose(0, 1)

    def _cached_conv_and_scan(self, xbc: torch.Tensor, dt: torch.Tensor, inference_context) -> torch.Tensor:
        """Generation: for each run of tokens the context names (``recurrent_segments``), a run
        from position 0 starts a state, a later run continues the stored one (single tokens
        of several runs in one batched step); states live in
        ``inference_context.recurrent_states`` under (layer number, sequence)."""
        states = getattr(inference_context, "recurrent_states", None)
        if states is None:
            raise ValueError(f"Mamba layers need an inference context that keeps recurrent states, got "
                             f"{type(inference_context).__name__}")
        y = xbc.new_empty(*xbc.shape[:2], self.d_inner_local)
        step_tokens, step_states = [], []
        for sequence, first, n, start in inference_context.recurrent_segments(xbc.shape[1]):
            key = (self.layer_number, sequence)
            state = None
            if start > 0:
                state = states.get(key)
                if state is None:
                    raise ValueError(f"Mamba layer {self.layer_number}: no recurrent state to continue from at "
                                     f"position {start}; a sequence's first forward must start at position 0 "
                                     "(the prefill)")
            if n == 1 and state is not None:
                step_tokens.append(first)
                step_states.append(state)
            else:
                y[:, first:first + n], after = self._scan_from_state(xbc[:, first:first + n], dt[:, first:first + n],
                                                                     state)
                _store_state(states, key, after)
        if step_tokens == list(range(xbc.shape[1])):
            # Every token advances a state (decoding): no gather or scatter by a host list,
            # which would copy it to the device and could not be captured in a CUDA graph.
            return self._step_many(xbc, dt, step_states)
        if step_tokens:
            y[:, step_tokens] = self._step_many(xbc[:, step_tokens], dt[:, step_tokens], step_states)
        return y

    def forward(self, hidden_states: torch.Tensor, inference_context=None) -> Tuple[torch.Tensor, None]:
        zxbcdt, _ = self.in_proj(hidden_states)  # [s, b, proj/tp]
        z, xbc, dt = self._split_projection(zxbcdt)
        z = z.transpose(0, 1)  # [b, s, d_inner/tp]: the scan runs batch first
        if self.context_parallel is not None:
            if inference_context is not None:
                raise ValueError("generation does not run context-parallel: load the model with "
                                 "--context-parallel-size 1")
            cp = self.context_parallel
            xbc, dt = cp.to_heads(xbc, dt)
            y = cp.to_sequence(self._conv_and_scan(xbc, dt, cp.share(self._whole_share())))
        elif inference_context is None:
            y = self._conv_and_scan(xbc.transpose(0, 1), dt.transpose(0, 1), self._whole_share())
        else:
            y = self._cached_conv_and_scan(xbc.transpose(0, 1), dt.transpose(0, 1), inference_context)
        y = gated_rms_norm(y, z, self.norm.weight, self.ngroups_local, self.mamba_config.norm_eps)
        out, _ = self.out_proj(y.transpose(0, 1).contiguous())
        return out, None


def _store_state(states: dict, key, state) -> None:
    """Keep ``state`` (conv, SSM) under ``key``, written into the tensors already there when
    their shapes match: a CUDA graph captured over an inference context reads them at the
    same addresses in every later batch of the same shape."""
    held = states.get(key)
    if held is not None and all(h.shape == t.shape and h.dtype == t.dtype for h, t in zip(held, state)):
        for h, t in zip(held, state):
            h.copy_(t)
    else:
        states[key] = state
