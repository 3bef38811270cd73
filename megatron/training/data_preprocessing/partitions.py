"""--partitions N: encode N slices of the input in parallel processes, then merge them.

As in Megatron-LM, line ``i`` of the (globbed, here sorted) inputs goes to partition
``i % N``, or with --keep-sequential-samples to partition ``i // ceil(lines / N)``; each
partition is encoded with ``--workers / N`` workers, and the partitions are concatenated in
order with ``IndexedDatasetBuilder.add_index``. The merged dataset therefore has Megatron's
document order. Unlike Megatron, no partition copies of the input are written next to it
(each partition process reads the inputs and keeps its own lines, so errors still name the
original file and line) and the per-partition datasets live in a temporary directory beside
the output, removed at the end.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Dict, List, Optional, Sequence

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron.training.data_preprocessing.bad_lines import BadInputError, BadLinePolicy, concatenate_rejects
from megatron.training.data_preprocessing.encoder import EncoderConfig, build_encoder, install_encoder, installed_encoder
from megatron.training.data_preprocessing.json_lines import count_lines
from megatron.training.data_preprocessing.pipeline import (
    EncodeStats,
    LineSelection,
    dataset_prefix,
    encode_to_datasets,
)


@dataclass
class PartitionJob:
    """One partition's work, as sent to its process."""

    paths: List[str]
    output_prefix: str
    level: str
    workers: int
    log_interval: int
    selection: LineSelection
    rejects_path: Optional[str]
    config: EncoderConfig


def _exit_on_sigterm(signum, frame):
    # Raising lets the pool and the dataset builders clean up when the parent cancels us.
    sys.exit(1)


def _partition_main(job: PartitionJob, conn) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    policy = BadLinePolicy(job.rejects_path)
    try:
        encoder = installed_encoder() or build_encoder(job.config)
        stats = encode_to_datasets(job.paths, job.output_prefix, job.level, encoder, job.workers, policy,
                                   job.log_interval, job.selection, job.config)
        policy.close()
        conn.send(("ok", stats))
    except BaseException as err:  # the parent reports it; nothing may escape silently
        policy.close(publish=False)
        conn.send((type(err).__name__, str(err)))
        conn.close()
        sys.exit(1)
    conn.close()


def _collect(processes: Dict[int, tuple]) -> Dict[int, EncodeStats]:
    """Wait for every partition; on the first failure stop the others and raise its error."""
    results: Dict[int, EncodeStats] = {}
    pending = dict(processes)
    while pending:
        ready = wait([c for _, c in pending.values()] + [p.sentinel for p, _ in pending.values()])
        for index, (proc, conn) in list(pending.items()):
            if conn not in ready and proc.sentinel not in ready:
                continue
            try:
                message = conn.recv() if conn.poll() else None
            except EOFError:
                message = None
            proc.join()
            del pending[index]
            if message is not None and message[0] == "ok":
                results[index] = message[1]
                continue
            for other, _ in pending.values():
                other.terminate()
            for other, _ in pending.values():
                other.join()
            if message is None:
                raise RuntimeError(f"partition {index} exited with code {proc.exitcode} without a result")
            kind, text = message
            raise (BadInputError if kind == "BadInputError" else ValueError)(text)
    return results


def _merge(level: str, keys: Sequence[str], dtype, part_prefixes: List[str], output_prefix: str) -> None:
    for key in keys:
        builder = IndexedDatasetBuilder(get_bin_path(dataset_prefix(output_prefix, key, level)), dtype=dtype)
        try:
            for prefix in part_prefixes:
                builder.add_index(dataset_prefix(prefix, key, level))
            builder.finalize(get_idx_path(dataset_prefix(output_prefix, key, level)))
        except BaseException:
            builder.abort()
            raise


def run_partitions(paths: List[str], output_prefix: str, level: str, encoder, config: EncoderConfig,
                   workers: int, partitions: int, keep_sequential_samples: bool, log_interval: int,
                   rejects_path: Optional[str]) -> EncodeStats:
    """Encode ``partitions`` slices with ``workers // partitions`` workers each and merge them."""
    sequential_size = math.ceil(count_lines(paths) / partitions) if keep_sequential_samples else None
    workdir = f"{output_prefix}.partitions.tmp.{os.getpid()}"
    os.makedirs(workdir)
    base = os.path.basename(output_prefix)
    part_prefixes = [os.path.join(workdir, f"{base}_{i}") for i in range(partitions)]
    part_rejects = [os.path.join(workdir, f"rejects_{i}.jsonl") for i in range(partitions)]
    fork = "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    if fork:
        install_encoder(encoder)
    try:
        processes = {}
        for i in range(partitions):
            job = PartitionJob(paths, part_prefixes[i], level, workers // partitions, log_interval,
                               LineSelection(i, partitions, sequential_size),
                               part_rejects[i] if rejects_path else None, config)
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_partition_main, args=(job, sender), name=f"partition-{i}")
            proc.start()
            sender.close()
            processes[i] = (proc, receiver)
        results = _collect(processes)
        _merge(level, encoder.json_keys, encoder.dtype.type, part_prefixes, output_prefix)
        total = EncodeStats(tokens={key: 0 for key in encoder.json_keys})
        for stats in results.values():
            total.documents += stats.documents
            total.bytes_read += stats.bytes_read
            total.blank_lines += stats.blank_lines
            total.rejected += stats.rejected
            total.seconds = max(total.seconds, stats.seconds)
            for key, count in stats.tokens.items():
                total.tokens[key] += count
        if rejects_path:
            concatenate_rejects(part_rejects, rejects_path)
        return total
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
