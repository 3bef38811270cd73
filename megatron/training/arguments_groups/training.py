"""Regularization, training-loop, initialization and learning-rate flags."""

from __future__ import annotations

import argparse

from megatron.training.arguments_groups.flag_helpers import add_off_switch


def add_regularization_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Dropout, weight decay, gradient clipping and optimizer hyper-parameters."""
    g = parser.add_argument_group(title="regularization")
    g.add_argument("--attention-dropout", type=float, default=0.1, help=None)
    g.add_argument("--hidden-dropout", type=float, default=0.1, help=None)
    g.add_argument("--weight-decay", type=float, default=0.01, help="Weight decay coefficient (L2 / decoupled).")
    g.add_argument("--start-weight-decay", type=float, default=None,
                   help="Initial weight decay of a non-constant --weight-decay-incr-style.")
    g.add_argument("--end-weight-decay", type=float, default=None,
                   help="Final weight decay of a non-constant --weight-decay-incr-style.")
    g.add_argument("--weight-decay-incr-style", type=str, default="constant",
                   choices=["constant", "linear", "cosine"], help="Weight decay schedule.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Clip gradients to this global L2 norm.")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam-eps", type=float, default=1e-08, help="Adam epsilon.")
    g.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum.")
    g.add_argument("--lion-beta1", type=float, default=0.95,
                   help="Lion: weight of the momentum in the interpolation whose sign is the update.")
    g.add_argument("--lion-beta2", type=float, default=0.98, help="Lion: decay rate of the momentum.")
    g.add_argument("--apply-wd-to-qk-layernorm", action="store_true",
                   help="Apply weight decay to the q/k layernorm params too (biases and other 1-D params "
                        "still get none).")
    g.add_argument("--head-lr-mult", type=float, default=1.0,
                   help="Learning-rate multiplier for the params of a module named 'head' (a classification "
                        "head); the language models here have none.")
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Batch sizes, run length, exit conditions, recompute, fusions and memory hygiene."""
    g = parser.add_argument_group(title="training")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="Samples per micro-batch per data-parallel rank (required).")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Samples per optimizer step over all data-parallel ranks; default micro-batch-size * DP.")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                   metavar=("START", "INCREMENT", "SAMPLES"),
                   help="Ramp the global batch size from START by INCREMENT over SAMPLES samples "
                        "(sample-based training only).")
    g.add_argument("--step-batch-size-schedule", type=str, default=None,
                   help="Global batch size by tokens consumed, as \"THRESHOLD:BATCH_SIZE ...\" with thresholds "
                        "in tokens (K, M, B, T suffixes), the first 0, e.g. \"0:768 250B:1536\"; "
                        "--global-batch-size defaults to its largest batch (sample-based training only).")
    g.add_argument("--phase-transition-iterations", type=str, default=None,
                   help="Iterations, comma-separated, at which the run saves and exits so the next training "
                        "phase can start from that checkpoint with other data; each phase's dataset is built "
                        "for that phase and read from its start.")
    g.add_argument("--decrease-batch-size-if-needed", action="store_true",
                   help="Round the global batch size down to a multiple of micro-batch-size * DP.")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Selective activation recompute (same as --recompute-granularity selective).")
    g.add_argument("--recompute-granularity", type=str, default=None, choices=["full", "selective"], help=None)
    g.add_argument("--recompute-method", type=str, default=None, choices=["uniform", "block"], help=None)
    g.add_argument("--recompute-num-layers", type=int, default=None, help=None)
    g.add_argument("--recompute-modules", nargs="*", type=str, default=None,
                   help="Submodules recomputed by selective recompute (default: core_attn).")
    g.add_argument("--distribute-saved-activations", action="store_true", help=None)
    add_off_switch(g, "check_for_nan_in_loss_and_grad",
                   help="Do not check the loss and gradients for NaN/Inf before each optimizer step.")
    g.add_argument("--check-for-spiky-loss", action="store_true", help="Check for unexpectedly large losses.")
    g.add_argument("--check-for-large-grads", action="store_true", help="Check for unexpectedly large gradients.")
    g.add_argument("--train-iters", type=int, default=None, help="Optimizer steps to train for.")
    g.add_argument("--train-samples", type=int, default=None, help="Samples to train for (sample-based training).")
    g.add_argument("--log-interval", type=int, default=100, help="Print the iteration log line every this many steps.")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Exit after an iteration that is a multiple of this.")
    g.add_argument("--exit-duration-in-mins", type=int, default=None, help="Exit after this many minutes.")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="On --exit-signal, all ranks agree on a step, save a checkpoint and exit.")
    g.add_argument("--exit-signal", type=str, default="SIGTERM",
                   choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"],
                   help="Signal that --exit-signal-handler listens for.")
    # Beyond Megatron: report a stuck rank before the process-group timeout (hang_watchdog.py).
    g.add_argument("--hang-watchdog-seconds", type=float, default=0,
                   help="When no training phase (forward-backward, optimizer, checkpoint save, evaluation) is "
                        "entered for this many seconds, log the rank, iteration and phase and dump every "
                        "thread's stack. 0: off. Must exceed the longest save or evaluation.")
    g.add_argument("--hang-watchdog-exit", action="store_true",
                   help="After the --hang-watchdog-seconds report, exit with status 124 (so that a launcher "
                        "with restarts resumes the job) instead of waiting for the process-group timeout.")
    g.add_argument("--tensorboard-dir", type=str, default=None, help="Write TensorBoard logs here.")
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion",
                   help="Do not fuse scale, mask and softmax.")
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion",
                   help="Do not fuse bias add and GeLU.")
    g.add_argument("--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion",
                   help="Do not fuse bias add and SwiGLU.")
    g.add_argument("--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion",
                   help="Do not fuse bias add, dropout and residual add.")
    g.add_argument("--no-rope-fusion", action="store_false", dest="apply_rope_fusion",
                   help="Do not use the fused rotary-embedding kernel.")
    g.add_argument("--no-persist-layer-norm", action="store_true", help="Do not use the persistent layer-norm kernel.")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion",
                   help="Do not fuse weight-gradient accumulation into the GEMM.")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true", default=None, help=None)
    g.add_argument("--no-cross-entropy-loss-fusion", action="store_false", dest="cross_entropy_loss_fusion",
                   default=None, help="Compute the LM loss with the reference fp32 cross entropy on GPU too "
                                      "(the chunked one is the default there).")
    g.add_argument("--cross-entropy-fusion-impl", type=str, default="native", choices=["native", "te"], help=None)
    g.add_argument("--use-flash-attn", action="store_true", help="Legacy: use flash attention.")
    g.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd", "lion"],
                   help="Optimizer: adam (AdamW), sgd or lion.")
    g.add_argument("--dataloader-type", type=str, default=None, choices=["single", "cyclic", "external"],
                   help="Data sampler; default single.")
    g.add_argument("--no-data-sharding", action="store_false", dest="data_sharding",
                   help="With --dataloader-type cyclic: every data-parallel rank draws from one shuffle of the "
                        "whole dataset instead of shuffling a contiguous share of its own.")
    g.add_argument("--manual-gc", action="store_true",
                   help="Disable automatic GC; collect every --manual-gc-interval steps.")
    g.add_argument("--manual-gc-interval", type=int, default=0, help="Steps between manual GC runs (0: only at start).")
    g.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                   help="Do not run manual GC at evaluation boundaries.")
    g.add_argument("--empty-unused-memory-level", type=int, default=0, choices=[0, 1, 2],
                   help="Call torch.cuda.empty_cache(): 0 never, 1 after each step, 2 also after evaluation.")
    g.add_argument("--calculate-per-token-loss", action="store_true", help=None)
    g.add_argument("--deterministic-mode", action="store_true",
                   help="Bit-identical reruns: deterministic algorithms only; sets NCCL_ALGO, CUBLAS_WORKSPACE_CONFIG.")
    g.add_argument("--iterations-to-skip", nargs="+", type=int, default=[], help="Iterations whose batch is skipped.")
    g.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int, default=None,
                   help="Compare weight hashes across data-parallel replicas every this many steps.")
    g.add_argument("--profile", action="store_true", help="Profile steps --profile-step-start to --profile-step-end.")
    g.add_argument("--profile-step-start", type=int, default=10, help="First profiled step.")
    g.add_argument("--profile-step-end", type=int, default=12, help="Last profiled step.")
    g.add_argument("--use-pytorch-profiler", action="store_true", help="Use torch.profiler instead of nsys ranges.")
    g.add_argument("--profile-ranks", nargs="+", type=int, default=[0], help="Global ranks to profile.")
    g.add_argument("--yaml-cfg", type=str, default=None,
                   help="Megatron YAML config file; its values replace the command line's (needs PyYAML).")
    return parser


def add_initialization_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Seeds and weight initialisation."""
    g = parser.add_argument_group(title="initialization")
    g.add_argument("--seed", type=int, default=1234, help="Random seed for python, numpy, torch and data.")
    g.add_argument("--data-parallel-random-init", action="store_true",
                   help="Different initial weights on each data-parallel rank.")
    g.add_argument("--init-method-std", type=float, default=0.02, help=None)
    g.add_argument("--embedding-init-method-std", type=float, default=None, help=None)
    g.add_argument("--init-method-xavier-uniform", action="store_true", help="Xavier-uniform init for weights.")
    g.add_argument("--use-cpu-initialization", action="store_true", default=None, help=None)
    g.add_argument("--no-initialization", action="store_false", dest="perform_initialization",
                   help="Skip weight initialization (a checkpoint will overwrite the weights).")
    return parser


def add_learning_rate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Learning-rate schedule."""
    g = parser.add_argument_group(title="learning rate")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate.")
    g.add_argument("--lr-decay-style", type=str, default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"], help="Decay after warmup.")
    g.add_argument("--lr-wsd-decay-style", type=str, default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"], help="Annealing of the WSD schedule.")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="Decay horizon in iterations; default --train-iters.")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="Decay horizon in samples; default --train-samples.")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="Iterations of WSD annealing.")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="Samples of WSD annealing.")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="Warmup as a fraction of the decay horizon.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Warmup iterations.")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="Warmup samples.")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of warmup.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Floor of the learning rate.")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler", action="store_true",
                   dest="override_opt_param_scheduler",
                   help="On resume, take the schedule from these flags, not from the checkpoint.")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="On resume, take the schedule from the checkpoint.")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="Separate learning rate for embedding and output layer.")
    g.add_argument("--decoupled-min-lr", type=float, default=None, help="Minimum of --decoupled-lr.")
    return parser
