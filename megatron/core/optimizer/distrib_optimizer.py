"""``DistributedOptimizer``: fp32 main params and optimizer state sharded over data-parallel
ranks (--use-distributed-optimizer).

Works on model chunks wrapped by ``DistributedDataParallel`` built with
``use_distributed_optimizer=True``, whose buffers are padded so that every bucket splits
into dp equal blocks; dp rank r owns block r of every bucket (see
``param_and_grad_buffer``). Per step:

1. DDP has reduce-scattered (averaged) each bucket's grads into the owned block;
2. each param's piece inside the owned block gets an fp32 main param (a copy for
   fp16/bf16 params, a view of the param's own storage for fp32 params) whose ``.grad``
   is the matching piece of the grad buffer (a view when the buffer is fp32);
3. with a loss scaler: unscale and check for NaN/Inf; then the global grad norm and the
   zero count, summed over the dp shards and then over the model-parallel group; clip;
4. the torch optimizer steps the main-param pieces (its state exists only for them);
5. fp16/bf16 pieces are cast back into the param buffer's owned block, and DDP
   all-gathers every bucket (asynchronously with --overlap-param-gather: forward
   pre-hooks wait per bucket).

With --fp8-param-gather (``DistributedDataParallelConfig.fp8_param_gather``) the FP8
linears' weights have buffers of their own: step 5 quantizes their fp32 main pieces
into the buffers' uint8 twins with one scale per weight that all ranks agree on, and the
gather moves FP8 bytes (``megatron.core.fp8.param_gather``). Their main pieces are always
separate fp32 copies (the gathered values, dequantized, overwrite the model params).
``main_params_changed`` regathers them after the main params are loaded.

Memory per parameter with bf16 params, fp32 grads and Adam: 2 (param) + 4 (grad) +
12/dp (fp32 main param, exp_avg, exp_avg_sq) bytes.

With N distributed-optimizer instances (``num_distributed_optimizer_instances`` of the
DDP config) "dp" above is one instance, DP x CP / N ranks: the state is sharded inside
the instance and every instance holds and steps an identical copy (its grads were
all-reduced across instances after the reduce-scatter, see ``param_and_grad_buffer``).
So the grad statistics are summed inside the instance only, and the full state gathered
for a checkpoint is the instance's (every instance's is the same).

State (``state_dict``): the hyper-parameters of the param groups, the loss scaler, a
``sharding`` description (dp size and rank; per buffer the padded bucket ranges, the
unpadded sizes and, per param, its name, shape, range and bucket) and ``param_state``:
per buffer, per bucket, this rank's block as flat fp32 tensors ("param", "exp_avg",
"exp_avg_sq", ...; zero in padding); it loads back into the same layout only.
``get_parameter_state_dp_zero`` gathers the blocks of all dp ranks into each bucket's
full flat state (Megatron's distrib_optim.pt: per bucket, with ``per_bucket_numel`` and
``per_bucket_numel_unpadded``), and ``load_parameter_state_from_dp_zero`` loads that into
any dp size or bucket layout, matching params by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core import process_groups
from megatron.core.distributed.param_and_grad_buffer import BufferLayout
from megatron.core.optimizer.clip_grads import main_grad_of, unscale_and_check_for_nan
from megatron.core.optimizer.cpu_offload import offloaded_params
from megatron.core.optimizer.grad_scaler import MegatronGradScaler
from megatron.core.optimizer.optimizer import (
    _COPIED_PARAM_ATTRIBUTES,
    MegatronOptimizer,
    _zero_grad_group,
)
from megatron.core.optimizer.optimizer_config import OptimizerConfig
from megatron.core.optimizer.precision_aware_adam import PrecisionAwareAdamW
from megatron.core.process_groups import ProcessGroups, group_rank, group_size
from megatron.core.tensor_parallel.collectives import all_gather_first_dim

logger = logging.getLogger(__name__)

SHARDING_TYPE = "dp_reshardable"

Range = Tuple[int, int]


@dataclass(frozen=True)
class ParamRange:
    """The piece of one param owned by this dp rank; every range is [start, end).

    ``world``: the whole param in buffer coordinates; ``local``: the owned piece in
    buffer coordinates; ``param``: the owned piece in the param's flattened index;
    ``shard``: the owned piece inside this rank's block of bucket ``bucket_id``.
    """

    buffer_index: int
    bucket_id: int
    world: Range
    local: Range
    param: Range
    shard: Range


def owned_param_ranges(layout: BufferLayout, dp_size: int, dp_rank: int, buffer_index: int = 0
                       ) -> List[Optional[ParamRange]]:
    """For each param of ``layout`` (buffer order): its piece owned by ``dp_rank``, or None."""
    out: List[Optional[ParamRange]] = []
    for (start, end), bucket_id in zip(layout.param_ranges, layout.bucket_of_param):
        bucket_start, bucket_end = layout.bucket_ranges[bucket_id]
        shard_numel = (bucket_end - bucket_start) // dp_size
        own_start = bucket_start + dp_rank * shard_numel
        lo, hi = max(start, own_start), min(end, own_start + shard_numel)
        if lo >= hi:
            out.append(None)
            continue
        out.append(ParamRange(buffer_index, bucket_id, (start, end), (lo, hi),
                              (lo - start, hi - start), (lo - own_start, hi - own_start)))
    return out


@dataclass
class _Shard:
    """A model param, its owned range and the fp32 main param the optimizer steps."""

    model_param: torch.nn.Parameter
    main_param: torch.Tensor
    range: ParamRange

    @property
    def is_copy(self) -> bool:
        """The main param is a separate fp32 copy (fp16/bf16 params of the default
        optimizer); the precision-aware optimizer steps the model piece itself."""
        return self.main_param.data_ptr() != self.model_piece().data_ptr()

    def model_piece(self) -> torch.Tensor:
        return self.model_param.detach().view(-1)[self.range.param[0]:self.range.param[1]]

    def grad_piece(self) -> torch.Tensor:
        return self.model_param.main_grad.view(-1)[self.range.param[0]:self.range.param[1]]


class DistributedOptimizer(MegatronOptimizer):
    """Megatron's distributed optimizer (see the module docstring).

    Args:
        optimizer: a torch optimizer built over the model params' groups; its groups'
            params are replaced by this rank's fp32 main-param pieces.
        config: ``OptimizerConfig``.
        grad_scaler: loss scaler (required with --fp16), or None.
        init_state_fn: unused hook kept for Megatron's signature.
        model_chunks: the ``DistributedDataParallel`` chunks whose buffers are sharded.
        pg_collection: groups (mp and tp_ep_pp for grad statistics); the shards follow
            the DDP chunks' groups (dp_cp, or one instance of it).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimizerConfig,
        grad_scaler: Optional[MegatronGradScaler],
        init_state_fn: Optional[Callable],
        model_chunks: Sequence[torch.nn.Module],
        pg_collection: Optional[ProcessGroups] = None,
    ) -> None:
        super().__init__(optimizer, config, init_state_fn, pg_collection)
        if config.fp16 and grad_scaler is None:
            raise ValueError("--fp16 needs a loss scaler: leave --loss-scale unset for dynamic scaling or give a value")
        self.grad_scaler = grad_scaler
        self.model_chunks = list(model_chunks)
        pgs = process_groups.resolve(pg_collection)
        self.buffers = self._sharded_buffers()
        # The groups the DDP buffers shard over: data x context parallel, or this rank's
        # distributed-optimizer instance of it (every instance holds the same shards).
        self.data_parallel_group = getattr(self.model_chunks[0], "intra_dp_cp_group", pgs.dp_cp)
        expert_group = getattr(self.model_chunks[0], "intra_expt_dp_group", pgs.expt_dp)
        # The shards are disjoint over that group: sum statistics over it first, then over mp.
        self.grad_stats_parallel_group = (self.data_parallel_group, pgs.mp)
        self.expert_grad_stats_parallel_group = (expert_group, pgs.tp_ep_pp)
        self.overlap_param_gather = any(
            getattr(getattr(c, "ddp_config", None), "overlap_param_gather", False) for c in self.model_chunks
        )
        self.param_ranges: Dict[torch.nn.Parameter, ParamRange] = {}
        for index, buffer in enumerate(self.buffers):
            order = list(buffer.param_index_map)
            ranges = owned_param_ranges(buffer.layout, group_size(buffer.data_parallel_group),
                                        group_rank(buffer.data_parallel_group), index)
            self.param_ranges.update({p: r for p, r in zip(order, ranges) if r is not None})
        self.precision_aware = isinstance(self.optimizer, PrecisionAwareAdamW)
        self.fp8_buffers = [b for b in self.buffers if getattr(b, "fp8", None) is not None]
        self._fp8_params = {p for b in self.fp8_buffers for p in b.param_index_map}
        if self.fp8_buffers and self.precision_aware:
            raise ValueError(
                "--fp8-param-gather cannot be combined with --use-precision-aware-optimizer here: the FP8 weights "
                "are quantized from the default optimizer's fp32 master copies; drop one of the two flags"
            )
        self.shard_groups: List[List[_Shard]] = [self._shard_group(group) for group in self.optimizer.param_groups]
        if self.precision_aware:
            offload = offloaded_params(self.get_parameters(), config.optimizer_offload_fraction) \
                if config.optimizer_cpu_offload else []
            self.optimizer.init_storage(offload)
        params = self.get_parameters()
        device = params[0].device if params else self.buffers[0].grad_data.device
        self._scale_one = torch.ones(1, dtype=torch.float32, device=device)

    def _sharded_buffers(self) -> list:
        buffers = []
        for chunk in self.model_chunks:
            # A plain nn.Module has a ``buffers()`` method, not DDP's buffer list.
            is_ddp = hasattr(chunk, "param_to_bucket")
            chunk_buffers = list(chunk.buffers) + list(chunk.expert_parallel_buffers) if is_ddp else []
            if not chunk_buffers or not all(b.use_distributed_optimizer for b in chunk_buffers):
                raise ValueError(
                    "--use-distributed-optimizer needs every model chunk wrapped in DistributedDataParallel "
                    "with DistributedDataParallelConfig(use_distributed_optimizer=True)"
                )
            # Each buffer shards over its own group: dense params over data x context
            # parallel, expert params (expert parallelism > 1) over expert data parallel.
            buffers.extend(chunk_buffers)
        return buffers

    def _shard_group(self, group: dict) -> List[_Shard]:
        """Replace ``group['params']`` by the fp32 main pieces this rank owns."""
        shards = []
        for param in group["params"]:
            if param not in self.param_ranges:
                if not any(param in b.param_index_map for b in self.buffers):
                    raise ValueError(f"a param of shape {tuple(param.shape)} is not in any DDP buffer")
                continue
            prange = self.param_ranges[param]
            piece = param.detach().view(-1)[prange.param[0]:prange.param[1]]
            if self.precision_aware and param.dtype in (torch.float16, torch.bfloat16, torch.float32):
                main = piece  # the optimizer keeps the master values (and writes the piece)
            elif param.dtype in (torch.float16, torch.bfloat16) or param in self._fp8_params:
                # a weight gathered in FP8 gets its dequantized value back: its master is a copy
                main = piece.clone().float()
            elif param.dtype == torch.float32:
                main = piece  # a view: the step updates the param buffer's owned block directly
            else:
                raise TypeError(f"optimizer params must be float16, bfloat16 or float32; got {param.dtype}")
            for name in _COPIED_PARAM_ATTRIBUTES:
                if hasattr(param, name):
                    setattr(main, name, getattr(param, name))
            shards.append(_Shard(param, main, prange))
        group["params"] = [s.main_param for s in shards]
        return shards

    def _all_shards(self):
        for group in self.shard_groups:
            yield from group

    def zero_grad(self, set_to_none: bool = True) -> None:
        for shard in self._all_shards():
            shard.main_param.decoupled_grad = None
        _zero_grad_group([s.main_param for s in self._all_shards()], set_to_none)
        _zero_grad_group([s.model_param for s in self._all_shards()], set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        return self.grad_scaler.scale if self.grad_scaler is not None else self._scale_one

    def reload_model_params(self) -> None:
        """Refresh the fp32 pieces of fp16/bf16 params from the model (fp32 pieces are views)."""
        if self.precision_aware:
            self.optimizer.reload_master_params()
        for shard in self._all_shards():
            if shard.is_copy:
                shard.main_param.copy_(shard.model_piece())
        self.main_params_changed()

    @torch.no_grad()
    def main_params_changed(self) -> None:
        """The main params were set outside a step (a checkpoint load): with
        --fp8-param-gather, quantize and all-gather the FP8 weights from them now, so the
        next forward computes with quantize(master) exactly as after a step. No-op
        without it. Collective over the data-parallel groups."""
        if not self.fp8_buffers:
            return
        self._finish_param_sync()
        self._quantize_fp8_shards()
        for buffer in self.fp8_buffers:
            for bucket in buffer.buckets:
                bucket.start_param_sync(async_op=False)

    def _main_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The reduced grad piece as the optimizer reads it: fp32, or kept in the buffer's
        bf16 with --main-grads-dtype bf16 (the precision-aware step upcasts it)."""
        if grad.dtype == torch.float32:
            return grad
        if self.precision_aware and self.config.main_grads_dtype == grad.dtype:
            return grad
        return grad.float()

    def prepare_grads(self) -> bool:
        """Point each main piece's ``.grad`` at its reduced grad; unscale; returns found_inf
        (MAX over dp and mp)."""
        for shard in self._all_shards():
            grad = self._main_grad(shard.grad_piece())
            if self.precision_aware:
                # As in Megatron: its dtype may differ from the param's, so not ``.grad``.
                shard.main_param.decoupled_grad = grad
            else:
                shard.main_param.grad = grad
        if self.grad_scaler is None:
            return False
        grads = [main_grad_of(s.main_param) for s in self._all_shards()]
        found_inf = unscale_and_check_for_nan(grads, self.grad_scaler.inv_scale, self.grad_stats_parallel_group)
        found = bool(found_inf.item() > 0)
        self.grad_scaler.update(found)
        return found

    def _copy_main_params_to_model_params(self) -> None:
        for shard in self._all_shards():
            if shard.is_copy and shard.model_param not in self._fp8_params:
                shard.model_piece().copy_(shard.main_param)
        self._quantize_fp8_shards()

    def _quantize_fp8_shards(self) -> None:
        """--fp8-param-gather: this rank's main pieces of the FP8 weights into the FP8
        buffers (collective: the scales' amaxes are reduced over the groups)."""
        for buffer in self.fp8_buffers:
            index = self.buffers.index(buffer)
            pieces = {s.model_param: (s.main_param.detach().view(-1), s.range.local)
                      for s in self._all_shards() if s.range.buffer_index == index}
            buffer.fp8.quantize_shards(pieces)

    def _finish_param_sync(self) -> None:
        for chunk in self.model_chunks:
            chunk.finish_param_sync()

    def _start_param_sync(self) -> None:
        for chunk in self.model_chunks:
            chunk.start_param_sync(async_op=self.overlap_param_gather)

    def _before_step(self) -> None:
        # A gather still in flight reads the owned blocks this step rewrites.
        self._finish_param_sync()

    def _after_update(self) -> None:
        self._copy_main_params_to_model_params()
        self._start_param_sync()

    def _param_names(self) -> Dict[torch.nn.Parameter, str]:
        names = {}
        for index, chunk in enumerate(self.model_chunks):
            module = getattr(chunk, "module", chunk)
            for name, param in module.named_parameters():
                names.setdefault(param, f"{index}.{name}" if len(self.model_chunks) > 1 else name)
        return names

    def sharding_metadata(self) -> dict:
        """How the flat state maps to params: enough to gather over dp and reshard."""
        names = self._param_names()
        buffers = []
        for buffer in self.buffers:
            layout = buffer.layout
            buffers.append({
                "param_dtype": str(buffer.param_dtype),
                "grad_dtype": str(buffer.grad_dtype),
                "numel": layout.numel,
                "numel_unpadded": layout.numel_unpadded,
                "bucket_ranges": list(layout.bucket_ranges),
                "bucket_numel_unpadded": list(layout.bucket_numel_unpadded),
                "params": [
                    {"name": names.get(p, ""), "shape": tuple(p.shape), "range": r, "bucket_id": b}
                    for p, r, b in zip(buffer.param_index_map, layout.param_ranges, layout.bucket_of_param)
                ],
            })
        dp = self.data_parallel_group
        return {"sharding_type": SHARDING_TYPE, "dp_size": group_size(dp), "dp_rank": group_rank(dp),
                "buffers": buffers}

    def _state_keys(self) -> Tuple[str, ...]:
        """The per-element optimizer states, present in every block (zero before a step)."""
        return {"adam": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",)}.get(self.config.optimizer,
                                                                             ("momentum_buffer",))

    def get_parameter_state(self) -> Tuple[List[List[Dict[str, torch.Tensor]]], Optional[dict]]:
        """(per buffer, per bucket: {key: this rank's flat fp32 block}, the other states
        such as Adam's step, or None while this rank's optimizer has no state). Keys:
        "param" (fp32 main values) and the per-element optimizer states; padding is zero."""
        keys = ("param",) + self._state_keys()
        blocks = [[{k: torch.zeros(b.shard_numel, dtype=torch.float32, device=b.grad_data.device) for k in keys}
                   for b in buffer.buckets] for buffer in self.buffers]
        scalars: Optional[dict] = None
        for shard in self._all_shards():
            lo, hi = shard.range.shard
            block = blocks[shard.range.buffer_index][shard.range.bucket_id]
            if self.precision_aware:
                scalars = self._precision_aware_state(shard, block, (lo, hi), scalars)
                continue
            block["param"][lo:hi] = shard.main_param.detach().view(-1)
            state = self.optimizer.state.get(shard.main_param, {})
            scalars = {} if state and scalars is None else scalars
            for key, value in state.items():
                if key in block and torch.is_tensor(value):
                    block[key][lo:hi] = value.detach().view(-1).float()
                elif value is not None:
                    scalars[key] = value.detach().clone() if torch.is_tensor(value) else value
        return blocks, scalars

    def _precision_aware_state(self, shard: _Shard, block: Dict[str, torch.Tensor], span: Range,
                               scalars: Optional[dict]) -> Optional[dict]:
        """Write one piece's unscaled fp32 state into ``block`` (the checkpoint format does
        not depend on the storage dtypes); returns the scalars seen so far."""
        optimizer, main = self.optimizer, shard.main_param
        lo, hi = span
        master = optimizer.get_unscaled(main, "master_param") if optimizer.needs_master(main) else main
        block["param"][lo:hi] = master.detach().view(-1)
        step = optimizer.step_count(main) if optimizer.has_moments(main) else None
        if step is None:
            return scalars
        for key in self._state_keys():
            block[key][lo:hi] = optimizer.get_unscaled(main, key).view(-1)
        return {"step": step.detach().clone()}

    def _set_shard_state(self, shard: _Shard, values: Dict[str, torch.Tensor], scalars: Optional[dict]) -> None:
        """Load one piece: ``values[key]`` are flat fp32 tensors of the piece's length;
        ``scalars`` None means the saved optimizer had no state yet."""
        if self.precision_aware:
            optimizer, main = self.optimizer, shard.main_param
            if optimizer.needs_master(main):
                optimizer.set_unscaled(main, "master_param", values["param"])
            else:
                main.copy_(values["param"].view_as(main))
            moments = None if scalars is None else {k: values[k] for k in self._state_keys()}
            optimizer.load_moments(main, moments, None if scalars is None else scalars.get("step", 0))
            return
        shard.main_param.copy_(values["param"].view_as(shard.main_param))
        if scalars is not None:
            state = {k: values[k].clone().view_as(shard.main_param) for k in self._state_keys()}
            state.update({k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()})
            self.optimizer.state[shard.main_param] = state

    def get_parameter_state_dp_zero(self) -> dict:
        """The whole dp group's state on every dp rank (what Megatron saves as
        distrib_optim.pt): ``buckets[buffer][bucket][key]`` is the bucket's full flat fp32
        state (padded; the blocks of all dp ranks in rank order), with
        ``per_bucket_numel`` / ``per_bucket_numel_unpadded``, ``scalar_state`` and the
        ``sharding`` map. Collective over the dp group (one instance of it with several
        distributed-optimizer instances: each instance gathers its own, identical copy)."""
        blocks, scalars = self.get_parameter_state()
        group = self.data_parallel_group
        buckets = [[{k: all_gather_first_dim(v, buffer.data_parallel_group) for k, v in block.items()}
                    for block in buffer_blocks]
                   for buffer, buffer_blocks in zip(self.buffers, blocks)]
        if group_size(group) > 1:
            # A rank that owns no param has no step count; take it from one that does.
            local = None if scalars is None else {k: v.cpu() if torch.is_tensor(v) else v for k, v in scalars.items()}
            gathered = [None] * group_size(group)
            dist.all_gather_object(gathered, local, group=group)
            scalars = next((g for g in gathered if g is not None), None)
        sharding = self.sharding_metadata()
        return {
            "sharding": sharding,
            "buckets": buckets,
            "scalar_state": scalars,
            "per_bucket_numel": [[e - s for s, e in b["bucket_ranges"]] for b in sharding["buffers"]],
            "per_bucket_numel_unpadded": [b["bucket_numel_unpadded"] for b in sharding["buffers"]],
        }

    def load_parameter_state_from_dp_zero(self, state: dict) -> None:
        """Load ``get_parameter_state_dp_zero()`` output saved with ANY dp size and bucket
        layout: params are matched by name and shape, then each rank takes its pieces."""
        by_name: Dict[str, Tuple[dict, int, Range]] = {}
        for buffer_meta, buffer_buckets in zip(state["sharding"]["buffers"], state["buckets"]):
            for entry in buffer_meta["params"]:
                bucket_start = buffer_meta["bucket_ranges"][entry["bucket_id"]][0]
                start, end = entry["range"]
                by_name[entry["name"]] = (buffer_buckets[entry["bucket_id"]], entry["shape"],
                                          (start - bucket_start, end - bucket_start))
        names = self._param_names()
        scalars = state.get("scalar_state")
        device = self._scale_one.device
        for shard in self._all_shards():
            name = names.get(shard.model_param, "")
            if name not in by_name or tuple(by_name[name][1]) != tuple(shard.model_param.shape):
                raise ValueError(
                    f"distributed-optimizer state has no param {name!r} of shape {tuple(shard.model_param.shape)}: "
                    "it was saved for another model; load with --no-load-optim"
                )
            full, _, (start, _) = by_name[name]
            lo, hi = start + shard.range.param[0], start + shard.range.param[1]
            self._set_shard_state(shard, {k: v[lo:hi].to(device) for k, v in full.items()}, scalars)
        self.main_params_changed()

    def state_dict(self) -> dict:
        blocks, scalars = self.get_parameter_state()
        state = {
            "param_groups": self.optimizer.state_dict()["param_groups"],
            "sharding": self.sharding_metadata(),
            "param_state": blocks,
            "scalar_state": scalars,
        }
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def _check_sharding(self, saved: dict) -> None:
        mine = self.sharding_metadata()
        for key in ("sharding_type", "dp_size", "dp_rank"):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"distributed-optimizer state has {key}={saved.get(key)!r} but this run has {mine[key]!r}; "
                    "the per-rank state only loads into the same data-parallel layout: reshard it by bucket "
                    "(see DistributedOptimizer docs) or load with --no-load-optim"
                )
        strip = lambda buffers: [{k: v for k, v in b.items() if k != "params"} for b in buffers]  # noqa: E731
        if strip(saved["buffers"]) != strip(mine["buffers"]):
            raise ValueError(
                "distributed-optimizer state was saved for another buffer layout (model, --ddp-bucket-size, "
                "--overlap-grad-reduce or dtype differ); load with --no-load-optim or use the same settings"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_sharding(state_dict["sharding"])
        groups = state_dict["param_groups"]
        if self.precision_aware:
            # torch's load_state_dict would drop the master params along with the state.
            for group, saved in zip(self.optimizer.param_groups, groups):
                group.update({k: v for k, v in saved.items() if k != "params"})
        else:
            self.optimizer.load_state_dict({"state": {}, "param_groups": groups})
        scalars = state_dict.get("scalar_state")
        for shard in self._all_shards():
            lo, hi = shard.range.shard
            block = state_dict["param_state"][shard.range.buffer_index][shard.range.bucket_id]
            self._set_shard_state(shard, {k: v[lo:hi] for k, v in block.items()}, scalars)
        self.main_params_changed()
        if "grad_scaler" in state_dict and self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        elif self.config.fp16:
            logger.info("no grad scaler state in the checkpoint: keeping the initial loss scale")
