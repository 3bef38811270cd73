"""Megatron-LM flags that the argument groups do not define, and what each one does here.

Megatron's launch scripts carry many flags this framework has no machinery behind (another
model family, a kernel library, a monitoring service) and legacy spellings from older
releases. None of them may be "unrecognized": each entry here says what happens instead.

- ``NO_EFFECT``: the flag only tunes something done differently here (a kernel, a memory or
  communication trick, an external monitor). It is accepted; one start-up warning lists every
  such flag that was given, with the reason.
- ``REFUSED``: the flag would change what is trained, evaluated or stored. Giving it is an
  error that names the flag, says why and what to use instead.
- ``ALIAS``: another spelling of a flag the argument groups define; it behaves exactly as
  that flag (implemented).

A table flag is registered only when the parser does not already define its option string:
the real definition always wins, so once a flag is implemented its entry here is simply not
used (tests/training/test_flag_table.py then asks for the entry to be deleted).

Table flags take any number of values (``nargs="*"``) because only their presence matters;
``same_as_here`` lists values that mean exactly what this framework does anyway (accepted
silently).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Tuple

NO_EFFECT = "accepted with no effect"
REFUSED = "refused"
ALIAS = "alias"

# The namespace attribute where table flags given on the command line are collected, as
# (flag, values) pairs, for check_table_flags.
GIVEN_ATTR = "megatron_table_flags_given"


@dataclass(frozen=True)
class TableFlag:
    flag: str
    status: str
    reason: str
    instead: str = ""
    legacy: bool = False  # not in Megatron-LM HEAD's parser; a spelling from older releases
    same_as_here: Tuple[str, ...] = ()
    section: str = ""  # the heading it is listed under in --help and docs/flags.md


TABLE: Dict[str, TableFlag] = {}
_SECTIONS: List[str] = []  # in order; the table below is written section by section


def _section(title: str) -> None:
    _SECTIONS.append(title)


def _add(status: str, reason: str, instead: str, flags: str, *, legacy: bool = False,
         same_as_here: Tuple[str, ...] = ()) -> None:
    for flag in flags.split():
        if flag in TABLE:
            raise ValueError(f"{flag} is listed twice in the flag table")
        TABLE[flag] = TableFlag(flag, status, reason, instead, legacy, same_as_here, _SECTIONS[-1])


def _refuse(reason: str, instead: str, flags: str, **kw) -> None:
    _add(REFUSED, reason, instead, flags, **kw)


def _no_effect(reason: str, flags: str, **kw) -> None:
    _add(NO_EFFECT, reason, "", flags, **kw)


def _family(family: str, flags: str, **kw) -> None:
    _add(REFUSED, f"the {family} is not available yet", "drop the flag; pretrain_gpt.py trains GPT models",
         flags, **kw)


_section("Model families not built yet")
_family("BERT embedder (retrieval)", "--bert-embedder-type --output-bert-embeddings")
_family("ICT/biencoder retriever model (BERT based)",
        "--biencoder-projection-dim --biencoder-shared-query-context-model --ict-head-size --ict-load "
        "--block-data-path --evidence-data-path --embedding-path --titles-data-path --query-in-block-prob "
        "--use-one-sent-docs --retriever-report-topk-accuracies --retriever-score-scaling "
        "--indexer-batch-size --indexer-log-interval --sample-rate")
_family("T5 model", "--relative-attention-max-distance --relative-attention-num-buckets")
_no_effect("the Mamba mixer has one path here (the chunked SSD scan, compiled on GPU)",
           "--disable-mamba-mem-eff-path")
_refuse("Mamba state dtypes other than the model's are not implemented",
        "leave them unset: states are kept in the parameters' dtype",
        "--mamba-inference-conv-states-dtype --mamba-inference-ssm-states-dtype --mamba-training-ssm-states-dtype")
_refuse("multi-token prediction is not implemented for hybrid models (GPT has --mtp-num-layers)", "drop the flag",
        "--mtp-hybrid-override-pattern")
_family("linear-attention (gated delta net) hybrid model",
        "--linear-attention-freq --linear-conv-kernel-dim --linear-key-head-dim --linear-num-key-heads "
        "--linear-num-value-heads --linear-value-head-dim --gdp-cutedsl-kernel "
        "--gdp-num-chunk-states-to-recompute --gdp-num-householder")
_family("RETRO model (removed from Megatron-LM after core_v0.15)",
        "--retro-project-dir --retro-add-retriever --retro-num-neighbors --retro-num-retrieved-chunks "
        "--retro-encoder-layers --retro-encoder-hidden-dropout --retro-encoder-attention-dropout "
        "--retro-attention-gate --retro-cyclic-train-iters --retro-verify-neighbor-count "
        "--retro-workdir --retriever-seq-length", legacy=True)
_family("vision/multimodal model",
        "--img-h --img-w --num-channels --patch-dim --classes-fraction --data-per-class-fraction "
        "--num-classes --dino-bottleneck-size --dino-freeze-last-layer --dino-head-hidden-size "
        "--dino-local-crops-number --dino-local-img-size --dino-norm-last-layer --dino-teacher-temp "
        "--dino-warmup-teacher-temp --dino-warmup-teacher-temp-epochs --swin-backbone-type "
        "--vision-backbone-type --vision-pretraining --vision-pretraining-type --mask-factor --mask-type "
        "--iter-per-epoch --mrope-section")
_refuse("this text-generation option is not implemented by tools/run_text_generation_server.py",
        "see docs/inference.md for the server's options",
        "--enable-chunked-prefill --flash-decode --num-speculative-tokens --use-legacy-static-engine "
        "--mlp-chunks-for-prefill --nccl-all-reduce-for-prefill --moe-pad-experts-for-cuda-graph-inference "
        "--inference-rng-tracker --inference-batch-times-seqlen-threshold --inference-coordinator-port "
        "--inference-cuda-graph-all-prefills --inference-cuda-graph-max-tokens --inference-cuda-graph-scope "
        "--inference-disable-ep-consensus --no-inference-disable-ep-consensus "
        "--inference-disable-triton-nvls-kernels --inference-dynamic-batching-async-sched-mode "
        "--inference-dynamic-batching-cuda-graph-mixed-prefill-count "
        "--inference-dynamic-batching-cuda-graph-sizing-distribution "
        "--inference-dynamic-batching-logprobs-mode --inference-dynamic-batching-mamba-memory-ratio "
        "--inference-dynamic-batching-max-requests --inference-dynamic-batching-num-cuda-graphs "
        "--inference-dynamic-batching-paused-buffer-size-gb --inference-dynamic-batching-prefix-caching "
        "--no-inference-dynamic-batching-prefix-caching "
        "--inference-dynamic-batching-prefix-caching-coordinator-policy "
        "--inference-dynamic-batching-prefix-caching-eviction-policy "
        "--inference-dynamic-batching-prefix-caching-mamba-gb "
        "--inference-dynamic-batching-prefix-caching-routing-alpha "
        "--inference-dynamic-batching-sampling-backend "
        "--inference-dynamic-batching-track-generated-token-events "
        "--inference-dynamic-batching-track-paused-request-events "
        "--inference-dynamic-batching-unified-memory-level --inference-fuse-tp-communication "
        "--inference-grouped-gemm-backend --inference-logging-step-interval "
        "--inference-moe-disable-fused-quant-kernels --inference-moe-token-dispatcher-type --inference-shards "
        "--inference-text-gen-server-logging --no-inference-text-gen-server-logging "
        "--inference-use-synchronous-zmq-collectives --no-inference-use-synchronous-zmq-collectives "
        "--inference-wandb-logging --no-inference-wandb-logging --use-same-sampling-seed-across-dp-ranks")
_no_effect("read by tools/run_text_generation_server.py (the text-generation server), not by training",
           "--decode-only-cuda-graphs --inference-dynamic-batching --inference-dynamic-batching-block-size "
           "--inference-dynamic-batching-buffer-size-gb --inference-dynamic-batching-max-tokens "
           "--inference-max-requests --inference-max-seq-length --max-tokens-to-oom")
_no_effect("read by tools/run_text_generation_server.py (the text-generation server), not by training",
           "--max-batch-size", legacy=True)
_refuse("this text-generation option is not implemented by tools/run_text_generation_server.py",
        "use --max-batch-size with the server", "--inference-max-batch-size", legacy=True)
_family("reinforcement-learning (GRPO) trainer",
        "--perform-rl-step --langrl-env-config --refit-method --grpo-clamp-eps-lower --grpo-clamp-eps-upper "
        "--grpo-entropy-term-weight --grpo-filter-groups-with-same-reward --grpo-group-size --grpo-iterations "
        "--grpo-kl-beta --grpo-prompts-per-step --rl-consumption-granularity --rl-default-temperature "
        "--rl-default-top-k --rl-default-top-p --rl-durable-rollout-bank --rl-generation-lag "
        "--rl-importance-sampling-truncation-coef --rl-inference-expert-model-parallel-size "
        "--rl-inference-expert-tensor-model-parallel-size --rl-inference-logprobs-is-correction "
        "--no-rl-inference-logprobs-is-correction --rl-inference-model-unified-memory-level "
        "--rl-inference-parsers --rl-inference-pipeline-model-parallel-size "
        "--rl-inference-tensor-model-parallel-size --rl-kv-cache-management-mode --rl-max-inflight-requests "
        "--rl-offload-inference-model-weights-when-idle --no-rl-offload-inference-model-weights-when-idle "
        "--rl-offload-optimizer-during-inference --rl-partial-rollouts --no-rl-partial-rollouts "
        "--rl-persist-cuda-graphs --no-rl-persist-cuda-graphs --rl-profile --rl-profile-dir "
        "--rl-prompts-per-eval --rl-rollout-bank-dir --rl-rollout-bank-max-bytes --rl-sequence-packing-algo "
        "--rl-sequence-packing-max-sequences-per-bin --rl-skip-bos-token --no-rl-skip-bos-token "
        "--rl-submission-granularity --rl-training-cuda-graphs --no-rl-training-cuda-graphs "
        "--rl-use-sequence-packing --no-rl-use-sequence-packing --rl-verify-model-weights-swap "
        "--no-rl-verify-model-weights-swap")

_section("Model architecture options not implemented")
_GPT_OPTIONS = "use the architecture flags listed in docs/flags.md as implemented"
_refuse("this multi-latent attention option is not implemented (fused down projections, cached latents)",
        _GPT_OPTIONS, "--mla-down-proj-fusion --cache-mla-latents")
_refuse("DeepSeek sparse attention (DSA) and experimental attention variants are not implemented", _GPT_OPTIONS,
        "--experimental-attention-variant --dsa-indexer-head-dim --dsa-indexer-k-norm-epsilon "
        "--dsa-indexer-k-norm-fp32 --dsa-indexer-loss-coeff --dsa-indexer-n-heads --dsa-indexer-rope-interleaved "
        "--dsa-indexer-skip-topk-offset --dsa-indexer-topk --dsa-indexer-topk-freq --dsa-indexer-use-sparse-loss "
        "--dsa-kernel-backend --no-dsa-indexer-rotate-activation --disable-dsa-indexer-rotate-activation "
        "--no-dsa-indexer-scoring-relu --disable-dsa-indexer-scoring-relu")
_refuse("this multi-token prediction (MTP) option is not implemented", "drop it; --mtp-num-layers and --mtp-loss-scaling-factor are implemented",
        "--mtp-detach-heads --mtp-hsm --mtp-standalone "
        "--mtp-use-repeated-layer")
_refuse("manifold hyper-connections (mHC) are not implemented", "drop the --mhc-* flags",
        "--enable-mhc-connections --mhc-init-gating-factor --mhc-num-residual-streams --mhc-recompute-layer-num "
        "--mhc-sinkhorn-iterations")
_refuse("this architecture option is not implemented", _GPT_OPTIONS,
        "--attention-output-gate "
        "--heterogeneous-layers-config-encoded-json --heterogeneous-layers-config-path "
        "--moe-latent-size --moe-mlp-glu-interleave-size "
        "--moe-shared-expert-glu-interleave-size --moe-single-grouped-weight --moe-single-grouped-bias")

_section("Optimization and numerics")
_refuse("the Muon optimizer is not implemented", "use --optimizer adam",
        "--muon-coefficient-type --muon-extra-scale-factor --muon-fp32-matmul-prec --muon-momentum "
        "--muon-nesterov --muon-no-split-qkv --muon-num-ns-steps --muon-scalar-optimizer --muon-scale-mode "
        "--muon-tp-mode --muon-use-syrk")
_refuse("muP parametrization is not implemented", "drop the --mup-* flags and set --init-method-std and --lr",
        "--use-mup --mup-attn-scale-power --mup-base-head-dim --mup-base-hidden-size --mup-embedding-mult "
        "--mup-output-mult --mup-width-mult")
_refuse("this optimizer option is not implemented", "drop the flag",
        "--freeze-all-layers --no-weight-decay-cond-type "
        "--qk-clip --qk-clip-alpha --qk-clip-threshold")
_refuse("fp4 training is not implemented", "train in bf16 (--bf16)",
        "--fp4-format --fp4-param-gather --fp4-recipe --fp4-quantizer-factory")
_refuse("batch-invariant (deterministic) kernels are not enforced", "drop it; runs are reproducible to rounding "
        "(same seed, same layout)", "--batch-invariant-mode --batch-invariant-backend")
_refuse("MoE routing with this option is not implemented", "drop the flag",
        "--moe-expert-rank-capacity-factor --moe-router-force-biased "
        "--moe-router-quantile-balancing-ema --moe-enable-routing-replay")
_refuse("MoE token dispatch runs in the activation dtype here", "drop the flag",
        "--moe-dispatch-fwd-dtype --moe-combine-bwd-dtype")
_no_effect("Transformer Engine FP8 details with no counterpart in the FP8 linears here (docs/fp8.md)",
           "--fp8-interval --fp8-output-proj --fp8-quantizer-factory --disable-fp8-wgrad --keep-fp8-transpose-cache "
           "--te-precision-config-file --reuse-grad-buf-for-mxfp8-param-ag")
_no_effect("the FP8 grouped linear of the MoE experts pads each expert's rows to a multiple of 16 itself, "
           "without changing the routing (docs/fp8.md)",
           "--moe-router-padding-for-fp8 --moe-router-padding-for-quantization")

_section("Data and evaluation")
_refuse("knowledge-distillation logit files are not implemented", "drop the --logits-* flags",
        "--logits-load-decode-threads --logits-load-dir --logits-load-ignore-errors --logits-load-kd-loss-alpha "
        "--logits-load-msc-prefetch-depth --logits-load-prefetch-factor --logits-save-dir --logits-save-dtype "
        "--logits-save-top-k --logits-save-top-p --logits-save-top-p-min-k")
_refuse("document masking inside the data loader is not implemented",
        "use --reset-attention-mask --reset-position-ids (and --eod-mask-loss)",
        "--dataloader-inter-document-masking")
_refuse("sentencepiece whitespace options are not implemented", "drop the flag",
        "--no-tokenizer-sentencepiece-ignore-extra-whitespaces "
        "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces")
_refuse("hybrid (per-sequence) context parallelism and sequence packing across ranks are not implemented",
        "use --context-parallel-size", "--hybrid-context-parallel --max-seqlen-per-dp-cp-rank")
_refuse("an explicit pipeline layout string is not implemented",
        "use --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers",
        "--pipeline-model-parallel-layout")
_refuse("this option is not implemented", "drop the flag", "--use-gigatoken --output-logit-dtype")
_no_effect("the dataset index is built and cached as Megatron does; this loading shortcut is not needed",
           "--dataloader-defer-npy-index-mmap --dataloader-fast-cache-load --per-dataset-sequences-path")

_section("Checkpoints")
_refuse("checkpoints are written in this framework's one format", "drop the flag",
        "--dist-ckpt-save-pre-mcore-014 --ckpt-convert-update-legacy-dist-opt-format "
        "--dist-ckpt-optim-fully-reshardable --distrib-optim-fully-reshardable-mem-efficient")
_no_effect("every rank writes and reads its own shards with torch.distributed.checkpoint",
           "--ckpt-fully-parallel-save --ckpt-fully-parallel-save-process-group "
           "--ckpt-fully-parallel-load-exchange-algo --ckpt-fully-parallel-load-per-rank-objects "
           "--ckpt-fully-parallel-load-process-group --ckpt-assume-constant-structure "
           "--ckpt-drop-redundant-extra-state --ckpt-pg-tensors-cache-create --ckpt-pg-tensors-cache-path "
           "--dist-ckpt-workers --async-ckpt-cpu-priority --async-ckpt-io-priority --async-ckpt-use-cpu-shm "
           "--async-strategy --use-persistent-ckpt-worker --no-ckpt-load-validate-sharding-integrity "
           "--disable-ckpt-load-validate-sharding-integrity --verify-integrity")
_no_effect("paths are read through the local file system (no multi-storage client)",
           "--enable-msc --disable-msc --object-storage-cache-path")

_section("Kernels, memory and communication tuning")
_no_effect("per-layer CUDA graphs and a graphed optimizer step are not built; --cuda-graph-impl full_iteration "
           "replays the whole forward-backward from one graph (docs/cuda_graphs.md)",
           "--cuda-graph-modules --enable-cuda-graph --external-cuda-graph --optimizer-cuda-graph "
           "--delay-offload-until-cuda-graph")
_no_effect("tensor-parallel communication overlap through Transformer Engine userbuffers is not used",
           "--no-tp-comm-bulk-dgrad --disable-tp-comm-bulk-dgrad --no-tp-comm-bulk-wgrad "
           "--disable-tp-comm-bulk-wgrad --no-tp-comm-overlap-ag --disable-tp-comm-overlap-ag "
           "--no-tp-comm-overlap-rs --disable-tp-comm-overlap-rs --no-tp-comm-split-ag --disable-tp-comm-split-ag "
           "--no-tp-comm-split-rs --disable-tp-comm-split-rs --tp-comm-overlap-cfg --tp-comm-overlap-rs-dgrad "
           "--tp-comm-bootstrap-backend --disable-symmetric-registration --symmetric-ar-type "
           "--gtp-expert-remat-nccl-ub --gtp-remat-nccl-ub --gtp-remat-opt-in-modules "
           "--gtp-remat-reduce-scatter-with-fp32-accumulation --tensor-parallel-num-weight-shards "
           "--expert-tensor-parallel-num-weight-shards")
_no_effect("MoE tokens are exchanged with all-to-all or all-gather in PyTorch; no DeepEP/HybridEP kernels",
           "--moe-enable-deepep --moe-deepep-num-sms --moe-flex-dispatcher-backend --moe-flex-dispatcher-num-sms "
           "--moe-hybridep-num-blocks-permute --moe-hybridep-num-blocks-unpermute --moe-hybridep-num-sms "
           "--moe-hybridep-num-sms-preprocessing --moe-hybridep-pad-uneven-dispatch-inputs "
           "--moe-permute-fusion-into-hybridep --moe-ncclep-zero-copy --moe-router-fusion --moe-use-grouped-tensor "
           "--moe-paged-stash --moe-paged-stash-buffer-size-factor-cpu --moe-paged-stash-buffer-size-factor-cuda "
           "--moe-paged-stash-page-size --overlap-moe-expert-parallel-comm "
           "--overlap-dispatch-backward-with-experts-wgrad --ep-overlap-early-attn-memory-release "
           "--high-priority-a2a-comm-stream --high-priority-stream-groups --use-grouped-gemm-for-dense-mlp "
           "--use-grouped-gemm-for-shared-expert")
_no_effect("the local PyTorch layers are used; no Transformer Engine or kitchen kernels",
           "--use-te-activation-func --use-transformer-engine-op-fuser --use-kitchen-attention "
           "--kitchen-attention-backend --fused-residual-rmsnorm --use-fused-weighted-squared-relu "
           "--flash-attention-version --te-rng-tracker --disable-jit-fuser --onnx-safe "
           "--no-clone-scatter-output-in-embedding --disable-clone-scatter-output-in-embedding "
           "--enable-experimental")
_no_effect("weight gradients are computed in the backward pass as they come",
           "--defer-embedding-wgrad-compute --wgrad-deferral-limit --delay-wgrad-compute "
           "--mlp-chunks-for-training")
_no_effect("gradients are accumulated and reduced in fp32 main_grad buffers here",
           "--ddp-reduce-scatter-with-fp32-accumulation --ddp-param-name-patterns-for-fp32-local-accumulation "
           "--no-gradient-reduce-div-fusion")
_no_effect("data-parallel buckets and groups are laid out as described in docs/parallelism.md",
           "--no-align-grad-reduce --disable-align-grad-reduce --no-use-layer-wise-param-layout "
           "--create-all-gather-group --sharp-enabled-group")
_no_effect("pipeline exchanges use the --distributed-backend groups", "--pipeline-model-parallel-comm-backend")
_no_effect("--distributed-timeout-minutes applies for the whole run", "--distributed-timeout-seconds-after-init")
_no_effect("the host-device synchronisation of the training loop is not tunable here", "--train-sync-interval")
_no_effect("--use-megatron-fsdp runs FSDP2 or the distributed optimizer here (docs/parallelism.md), whose "
           "buffers and communication these Megatron-FSDP knobs do not tune (no persistent double buffers, no NCCL "
           "user-buffer registration)",
           "--megatron-fsdp-version --fsdp-double-buffer --use-nccl-ub --suggested-communication-unit-size "
           "--megatron-fsdp-enable-fine-grained-param-gather --megatron-fsdp-max-pool-double-buffer "
           "--fsdp-db-use-persist-buf-on-alloc-fail --fsdp-manual-registration --enable-full-sharding-in-hsdp")
_no_effect("loading is always strict here: a key the model needs and the checkpoint lacks is an error naming "
           "it (--finetune and --no-load-optim skip the optimizer's keys)",
           "--no-strict-fsdp-dtensor-load --disable-strict-fsdp-dtensor-load")
_refuse("this framework's gradient communication and main-gradient dtypes are set by its own flags",
        "use --grad-reduce-in-bf16 (or --accumulate-allreduce-grads-in-fp32) for the reduction dtype",
        "--megatron-fsdp-grad-comm-dtype --megatron-fsdp-main-grads-dtype")
_refuse("the fp32 main weights are chosen by --use-precision-aware-optimizer --main-params-dtype here",
        "drop it (main weights are fp32), or use --use-precision-aware-optimizer --main-params-dtype",
        "--megatron-fsdp-main-params-dtype", same_as_here=("fp32",))
_refuse("the model is built whole on every rank and then sharded; building on the meta device and "
        "materializing only each rank's shard is not implemented (the peak memory at build time differs)",
        "drop --init-model-with-meta-device (every rank briefly holds the whole model in fp32)",
        "--init-model-with-meta-device")
_refuse("fine-grained (per-module) activation offloading is not implemented",
        "use --cpu-offloading-num-layers (whole layers) or --recompute-activations",
        "--fine-grained-activation-offloading")
_no_effect("activations of whole layers are offloaded as they are saved (--cpu-offloading-num-layers); "
           "these tune Megatron's fine-grained offloading, which is refused",
           "--cpu-offloading-retain-pinned-cpu-buffers "
           "--fine-grained-offloading-max-inflight-offloads --offload-modules --activation-offload-fraction "
           "--min-offloaded-tensor-size --delta-offload-bytes-across-pp-ranks")

_section("Monitoring, fault tolerance, debugging")
_no_effect("external monitors (one-logger, OpenTelemetry, straggler detection, config logger) are not built in",
           "--no-one-logger --one-logger-async --one-logger-project --one-logger-run-name --app-tag-run-name "
           "--app-tag-run-version --otel-enabled --otel-service-name --otel-span-groups --log-straggler "
           "--disable-straggler-on-startup --straggler-ctrlr-port --straggler-minmax-count "
           "--run-workload-inspector-server --config-logger-dir")
_no_effect("the NCCL flight recorder is configured through TORCH_NCCL_* environment variables",
           "--flight-recorder-dump-path --flight-recorder-include-stack-trace --flight-recorder-trace-buffer-size "
           "--no-flight-recorder-dump-on-timeout --disable-flight-recorder-dump-on-timeout "
           "--no-flight-recorder-extra-dump-on-exec --disable-flight-recorder-extra-dump-on-exec "
           "--no-flight-recorder-include-only-active --disable-flight-recorder-include-only-active")
_no_effect("restarts come from the launcher (torchrun's max-restarts option) and --load; no in-process restart, "
           "fault-tolerance package or fault injector",
           "--inprocess-restart --inprocess-active-world-size --inprocess-barrier-timeout "
           "--inprocess-completion-timeout --inprocess-empty-cuda-cache --inprocess-granularity "
           "--inprocess-hard-timeout --inprocess-heartbeat-interval --inprocess-heartbeat-timeout "
           "--inprocess-last-call-wait --inprocess-max-iterations --inprocess-monitor-process-interval "
           "--inprocess-monitor-thread-interval --inprocess-progress-watchdog-interval --inprocess-soft-timeout "
           "--inprocess-termination-grace-time --enable-ft-package --calc-ft-timeouts --ft-num-warmup-iters "
           "--fault-injector-delay-start-iteration --fault-injector-fault-delay "
           "--fault-injector-fault-probabilities --fault-injector-fault-types --fault-injector-mtti-seconds "
           "--fault-injector-num-ranks --fault-injector-offset-seconds --fault-injector-ranks "
           "--fault-injector-seed --gpu-sniff-test-interval "
           "--adlr-autoresume --adlr-autoresume-interval")
_no_effect("--exit-signal-handler covers the whole run", "--exit-signal-handler-for-dataloader "
           "--exit-signal-handler-for-training")
_no_effect("this debugging dump or extra metric is not written",
           "--log-device-memory-used --log-memory-interval --log-max-attention-logit --record-memory-history "
           "--memory-snapshot-path --record-shapes --pytorch-profiler-collect-callstack "
           "--pytorch-profiler-collect-chakra --pytorch-profiler-collect-shapes --nvtx-ranges "
           "--dump-param-to-param-group-map --save-activations-interval --save-dgrads-interval "
           "--save-params-interval --save-wgrads-interval --save-tokens-per-expert-interval "
           "--moe-routing-trace-capture-hidden-states --moe-routing-trace-capture-logits "
           "--moe-routing-trace-dump-weights --moe-routing-trace-max-training-iters --moe-routing-trace-path "
           "--test-mode")

_section("Spellings from older releases and deprecated flags")
_no_effect("models are always built the Megatron-Core way", "--use-mcore-models")
_refuse("Megatron's legacy models were removed (Megatron-LM did too)", "drop the flag", "--use-legacy-models",
        legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --micro-batch-size", "--batch-size")
_refuse("the old spelling was removed from Megatron-LM", "use --tensor-model-parallel-size",
        "--model-parallel-size")
_refuse("the old spelling was removed from Megatron-LM", "use --lr-warmup-fraction, --lr-warmup-iters or "
        "--lr-warmup-samples", "--warmup")
_refuse("the old spelling was removed from Megatron-LM", "use --recompute-activations (selective) or "
        "--recompute-granularity full --recompute-method uniform", "--checkpoint-activations")
_refuse("the old spelling was removed from Megatron-LM", "use --recompute-num-layers",
        "--checkpoint-num-layers", legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --distribute-saved-activations",
        "--distribute-checkpointed-activations", legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --moe-router-load-balancing-type",
        "--moe-router-type", legacy=True)
_refuse("token dropping is chosen by a capacity factor", "use --moe-expert-capacity-factor",
        "--moe-token-dropping", legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --expert-tensor-parallel-size",
        "--moe-extended-tp", legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --recompute-granularity",
        "--checkpoint-granularity", legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --recompute-method", "--checkpoint-method",
        legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --norm-epsilon", "--layernorm-epsilon", legacy=True)
_refuse("the old spelling was removed from Megatron-LM", "use --fp8-format e4m3 or --fp8-format hybrid",
        "--fp8-e4m3 --fp8-hybrid", legacy=True)
_refuse("a separate encoder parallel layout (T5, multimodal) is not available", "drop the flag",
        "--encoder-pipeline-model-parallel-size --encoder-tensor-model-parallel-size "
        "--pipeline-model-parallel-split-rank", legacy=True)
_refuse("the legacy tokenizer system was removed (Megatron-LM did too)", "drop the flag; --tokenizer-type "
        "selects the tokenizer", "--legacy-tokenizer", legacy=True)
_no_effect("the local rank comes from the LOCAL_RANK environment variable (torchrun, slurm)",
           "--local_rank", legacy=True)
_no_effect("old spelling: level-1 timers wait at a barrier unless --no-barrier-with-level-1-timing",
           "--barrier-with-L1-time", legacy=True)
_no_effect("removed from Megatron-LM: query-key layer scaling is off unless --apply-query-key-layer-scaling",
           "--no-query-key-layer-scaling", legacy=True)
_no_effect("removed from Megatron-LM: the learning rate and the batch size are always written to TensorBoard",
           "--no-log-learnig-rate-to-tensorboard --log-batch-size-to-tensorboard", legacy=True)
_no_effect("the local DDP with contiguous gradient buffers is always used (old Megatron choice)",
           "--DDP-impl --use-contiguous-buffers-in-local-ddp --no-contiguous-buffers-in-local-ddp",
           legacy=True, same_as_here=("local",))
_no_effect("old spelling; the tensor-parallel all-reduce is overlapped where it can be",
           "--async-tensor-model-parallel-allreduce --no-async-tensor-model-parallel-allreduce", legacy=True)
_no_effect("old spelling; use --overlap-grad-reduce / --overlap-param-gather", "--delay-grad-reduce "
           "--delay-param-gather", legacy=True)
_no_effect("old spelling; pipeline stages hold their embeddings as in Megatron-Core", "--standalone-embedding-stage",
           legacy=True)
_no_effect("old data flags: datasets are read with memory maps in Megatron's .bin/.idx format",
           "--mmap-warmup --data-impl", legacy=True, same_as_here=("mmap",))
_no_effect("old spelling; output tensors are freed after they are sent", "--deallocate-pipeline-outputs",
           legacy=True)

_section("Other spellings of implemented switches")
_add(ALIAS, "same as --no-log-loss-scale-to-tensorboard", "--no-log-loss-scale-to-tensorboard",
     "--disable-log-loss-scale-to-tensorboard")
_add(ALIAS, "same as --no-manual-gc-eval", "--no-manual-gc-eval", "--disable-manual-gc-eval")


class _TableFlagAction(argparse.Action):
    """Accept any values; remember (flag, values) for ``check_table_flags``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = list(getattr(namespace, GIVEN_ATTR, ()))
        setattr(namespace, GIVEN_ATTR, given + [(option_string, tuple(values))])


def is_table_action(action: argparse.Action) -> bool:
    """True for an action registered by ``add_table_flags`` for a flag without machinery."""
    return isinstance(action, _TableFlagAction)


def table_dest(flag: str) -> str:
    """Namespace attribute of a table flag: its name, marked so it never shadows a real flag."""
    return "table_" + flag.lstrip("-").replace("-", "_")


def add_table_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every table flag whose option string the parser does not define yet."""
    actions = {opt: action for action in parser._actions for opt in action.option_strings}
    groups = {}
    for flag, entry in TABLE.items():
        if flag in actions:
            continue  # the real definition wins
        if entry.section not in groups:
            groups[entry.section] = parser.add_argument_group(f"Other Megatron-LM flags: {entry.section.lower()}")
        group = groups[entry.section]
        if entry.status == ALIAS:
            target = actions[entry.instead]
            group.add_argument(flag, action="store_false", dest=target.dest, help=entry.reason)
            continue
        verdict = "no effect here" if entry.status == NO_EFFECT else "refused"
        group.add_argument(flag, nargs="*", default=None, dest=table_dest(flag), action=_TableFlagAction,
                           metavar="VALUE", help=f"{verdict}: {entry.reason}.".replace("%", "%%"))
    return parser


def check_table_flags(args: argparse.Namespace) -> List[str]:
    """Raise ValueError for a refused table flag that was given; return one line per given
    flag that has no effect (``--flag: why``)."""
    from megatron.training.argument_checks import invalid  # the house error format

    lines = []
    for flag, values in getattr(args, GIVEN_ATTR, ()):
        entry = TABLE[flag]
        if " ".join(values) in entry.same_as_here:
            continue
        if entry.status == REFUSED:
            shown = " ".join(values) if values else True
            raise invalid(flag, shown, f"is not supported: {entry.reason}", entry.instead)
        lines.append(f"{flag}: {entry.reason}")
    return lines
