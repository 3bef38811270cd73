"""``ProcessGroupCollection``: Megatron-Core's name for this package's ``ProcessGroups``
(the same attributes: tp, pp, dp, dp_cp, cp, mp, tp_cp, tp_dp, tp_dp_cp, embd, pos_embd, ep,
expt_tp, expt_dp, tp_ep, tp_ep_pp, and the distributed-optimizer instance groups intra_dp_cp,
intra_expt_dp, inter_dist_opt, inter_expt_dist_opt)."""

from __future__ import annotations

from megatron.core.process_groups import ProcessGroups, default_process_groups


class ProcessGroupCollection(ProcessGroups):
    """A ``ProcessGroups`` built field by field, as Megatron-Core's collection is."""

    @classmethod
    def use_mpu_process_groups(cls, required_pgs=None) -> "ProcessGroupCollection":
        """The groups ``parallel_state.initialize_model_parallel`` made (all of them, or the
        attributes named in ``required_pgs``). Raises ValueError for an unknown name."""
        groups = default_process_groups()
        names = [item for item in groups.names()] if required_pgs is None else list(required_pgs)
        known = set(groups.names())
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"use_mpu_process_groups: unknown process group(s) {unknown}; known: {sorted(known)}")
        return cls(**{name: getattr(groups, name) for name in names})
