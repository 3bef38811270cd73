"""Parallel layout and communication flags."""

from __future__ import annotations

import argparse
import os


def _on_off(text: str) -> bool:
    """A flag's true/false value: Megatron writes ``--lazy-mpu-init True``; ``False`` means off."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Parallel sizes, pipeline layout, backend and gradient/parameter communication."""
    g = parser.add_argument_group(title="distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help=None)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help=None)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, help=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, help=None)
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true", help=None)
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true", help=None)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Layers per virtual pipeline stage (interleaved schedule).")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="Virtual pipeline stages (model chunks) per pipeline rank.")
    g.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", type=int, default=None, help=None)
    g.add_argument("--no-overlap-p2p-communication", action="store_false", dest="overlap_p2p_comm",
                   help="Do not overlap pipeline send/recv with compute (interleaved schedule).")
    g.add_argument("--overlap-p2p-communication-warmup-flush", action="store_true",
                   help="Also overlap p2p communication in warmup and flush.")
    g.add_argument("--distributed-backend", type=str, default="nccl", choices=["nccl", "gloo"],
                   help="torch.distributed backend. This framework falls back to gloo when CUDA is absent.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10, help="Timeout of collectives, minutes.")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="Overlap gradient reduction with backward.")
    g.add_argument("--ddp-num-buckets", type=int, default=None, help="Number of gradient buckets.")
    g.add_argument("--ddp-bucket-size", type=int, default=None, help="Gradient bucket size (elements).")
    g.add_argument("--ddp-pad-buckets-for-high-nccl-busbw", action="store_true",
                   help="Pad distributed-optimizer buckets to a multiple of 2^16 elements for NCCL bus bandwidth.")
    g.add_argument("--ddp-average-in-collective", action="store_true",
                   help="Average gradients inside the collective instead of pre-scaling.")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="Overlap the distributed optimizer's parameter all-gather with forward.")
    g.add_argument("--overlap-param-gather-with-optimizer-step", action="store_true",
                   help="Start the parameter all-gather inside the optimizer step.")
    g.add_argument("--no-align-param-gather", action="store_false", dest="align_param_gather",
                   help="Do not align parameter all-gathers across virtual pipeline chunks.")
    g.add_argument("--no-scatter-gather-tensors-in-pipeline", action="store_false",
                   dest="scatter_gather_tensors_in_pipeline",
                   help="Do not scatter/gather pipeline tensors over tensor-parallel ranks.")
    g.add_argument("--use-ring-exchange-p2p", action="store_true", help="Use ring exchange for pipeline p2p.")
    g.add_argument("--local-rank", type=int, default=int(os.getenv("LOCAL_RANK", "0")),
                   help="Local rank (torchrun sets LOCAL_RANK).")
    g.add_argument("--lazy-mpu-init", type=_on_off, nargs="?", const=True, default=None,
                   help="initialize_megatron() parses and installs the flags but leaves torch.distributed, the "
                        "model-parallel groups and the seeds to the function it returns, for launchers that set "
                        "up distribution themselves; implies --use-cpu-initialization. pretrain() calls that "
                        "function at once. Takes Megatron's value (--lazy-mpu-init True) or none.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard optimizer state over data-parallel ranks (ZeRO-1).")
    g.add_argument("--num-distributed-optimizer-instances", type=int, default=1,
                   help="With --use-distributed-optimizer, split the data x context parallel ranks into this "
                        "many instances of consecutive ranks (typically one per node or group of nodes): the "
                        "optimizer state is sharded inside each instance and every instance holds a full copy; "
                        "gradients are reduce-scattered inside the instance, then all-reduced across instances.")
    g.add_argument("--use-torch-fsdp2", action="store_true",
                   help="Shard params, grads and optimizer state over data-parallel ranks with PyTorch's "
                        "FSDP2 (fully_shard per layer); saves in --ckpt-format torch_dcp.")
    g.add_argument("--torch-fsdp2-no-reshard-after-forward", action="store_false",
                   dest="torch_fsdp2_reshard_after_forward",
                   help="Keep each layer's gathered params from forward to backward under --use-torch-fsdp2 "
                        "(less communication, more memory).")
    g.add_argument("--use-megatron-fsdp", "--use-custom-fsdp", action="store_true", dest="use_megatron_fsdp",
                   help="Megatron-FSDP's command line (--use-custom-fsdp is its old name): "
                        "--data-parallel-sharding-strategy picks FSDP2, the distributed optimizer or plain data "
                        "parallelism (docs/parallelism.md); needs --ckpt-format fsdp_dtensor.")
    g.add_argument("--data-parallel-sharding-strategy", type=str, default="optim_grads_params",
                   choices=["no_shard", "optim", "optim_grads", "optim_grads_params"],
                   help="With --use-megatron-fsdp, what is sharded over the data x context parallel ranks: "
                        "optim_grads_params runs FSDP2 (weights, grads and optimizer state), optim and "
                        "optim_grads the distributed optimizer (optimizer state; a full grad buffer stays on "
                        "every rank), no_shard plain data parallelism.")
    g.add_argument("--outer-dp-sharding-strategy", type=str, default="no_shard", choices=["no_shard", "optim"],
                   help="With --use-megatron-fsdp and --num-distributed-optimizer-instances > 1, what is sharded "
                        "across the instances: no_shard (replicas, as the distributed optimizer's instances do); "
                        "optim is refused here.")
    g.add_argument("--context-parallel-size", type=int, default=1, help=None)
    g.add_argument("--cp-comm-type", nargs="+", type=str, default=["p2p"], help=None)
    g.add_argument("--hierarchical-context-parallel-sizes", nargs="+", type=int, default=None, help=None)
    g.add_argument("--nccl-communicator-config-path", type=str, default=None, help="YAML of NCCL communicator options.")
    g.add_argument("--use-tp-pp-dp-mapping", action="store_true",
                   help="Order ranks tp-cp-ep-pp-dp instead of tp-cp-ep-dp-pp.")
    g.add_argument("--sequence-parallel", action="store_true", help=None)
    g.add_argument("--tp-comm-overlap", action="store_true", help=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help=None)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None, help=None)
    g.add_argument("--disable-gloo-process-groups", action="store_false", dest="enable_gloo_process_groups",
                   help="Do not create gloo twins of the data-parallel groups.")
    g.add_argument("--fake-process-group", action="store_true",
                   help="One process plays rank RANK of a WORLD_SIZE-rank job on torch's fake backend (no "
                        "collective communicates), to measure that rank's memory and step time on one GPU; "
                        "losses are meaningless and --save/--load are refused. See docs/dry_run.md.")
    g.add_argument("--use-sharp", action="store_true", help="Enable SHARP on the data-parallel group.")
    return parser
