"""Logging, TensorBoard and Weights & Biases flags."""

from __future__ import annotations

import argparse


def add_logging_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What the iteration log line and the writers report."""
    g = parser.add_argument_group(title="logging")
    g.add_argument("--log-params-norm", action="store_true", help="Add the parameters' L2 norm to the log line.")
    g.add_argument("--log-num-zeros-in-grad", action="store_true", help="Add the count of zero gradients.")
    g.add_argument("--log-throughput", action="store_true", help="Add TFLOP/s per GPU to the log line.")
    g.add_argument("--log-progress", action="store_true", help="Append job progress to <save>/progress.txt.")
    g.add_argument("--log-energy", action="store_true", help="Add energy and power per GPU to the log line.")
    g.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
                   help="Timers to report: 0 iteration only, 1 main steps, 2 everything.")
    g.add_argument("--timing-log-option", type=str, default="minmax", choices=["max", "minmax", "all"],
                   help="Report timers as the max, the min and max, or every rank's value.")
    g.add_argument("--no-barrier-with-level-1-timing", action="store_false", dest="barrier_with_L1_time",
                   help="Do not barrier before level-1 timers.")
    g.add_argument("--tensorboard-log-interval", type=int, default=1, help="Steps between TensorBoard writes.")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000, help="TensorBoard writer queue size.")
    g.add_argument("--log-timers-to-tensorboard", action="store_true", help="Write timers to TensorBoard.")
    g.add_argument("--no-log-loss-scale-to-tensorboard", action="store_false", dest="log_loss_scale_to_tensorboard",
                   help="Do not write the loss scale to TensorBoard.")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="Write validation perplexity to TensorBoard.")
    g.add_argument("--log-memory-to-tensorboard", action="store_true", help="Write memory statistics to TensorBoard.")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true", help="Write the world size to TensorBoard.")
    g.add_argument("--wandb-project", type=str, default="", help="Weights & Biases project; off when empty.")
    g.add_argument("--wandb-exp-name", type=str, default="", help="Weights & Biases run name.")
    g.add_argument("--wandb-save-dir", type=str, default="", help="Local directory for Weights & Biases files.")
    g.add_argument("--wandb-entity", type=str, default="", help="Weights & Biases entity (team).")
    g.add_argument("--logging-level", type=int, default=None, help="Python logging level (e.g. 10 DEBUG, 20 INFO).")
    return parser


def add_rerun_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Result validation by re-running suspicious iterations."""
    g = parser.add_argument_group(title="rerun engine")
    g.add_argument("--rerun-mode", type=str, default="validate_results",
                   choices=["disabled", "validate_results", "report_stats"],
                   help="Re-run iterations with suspicious results to classify the fault.")
    g.add_argument("--error-injection-rate", type=int, default=0,
                   help="Rate at which to inject unexpected results, e.g. 1000 for once every 1000 result "
                        "validations (0: never).")
    g.add_argument("--error-injection-type", type=str, default="transient_error",
                   choices=["correct_result", "transient_error", "persistent_error"],
                   help="Type of error to inject.")
    g.add_argument("--result-rejected-tracker-filename", type=str, default=None,
                   help="Optional name of file tracking `result_rejected` events.")
    return parser
