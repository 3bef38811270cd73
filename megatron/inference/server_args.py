"""Flags of tools/run_text_generation_server.py (Megatron's spellings and defaults), on top
of the model, checkpoint and tokenizer flags every entry point takes."""

from __future__ import annotations

import argparse


def add_text_generate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="text generation")
    group.add_argument("--port", type=int, default=5000, help="Port the HTTP server listens on.")
    group.add_argument("--host", type=str, default="0.0.0.0",
                       help="Address the HTTP server binds (Megatron binds 0.0.0.0; 127.0.0.1 keeps it local).")
    group.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature for --prompts.")
    group.add_argument("--top_k", type=int, default=1, help="Top-k sampling for --prompts (1: greedy).")
    group.add_argument("--top_p", type=float, default=0.0, help="Top-p sampling for --prompts (0: off).")
    group.add_argument("--return-log-probs", action=argparse.BooleanOptionalAction, default=True,
                       help="Print the log-probs of the --prompts generations.")
    group.add_argument("--num-tokens-to-generate", type=int, default=30, help="Tokens to generate for --prompts.")
    group.add_argument("--prompts", type=str, nargs="+", default=None,
                       help="Generate for these prompts, print the results and exit instead of serving.")
    group.add_argument("--max-batch-size", type=int, default=None,
                       help="Deprecated: use --inference-max-requests.")
    group.add_argument("--inference-max-requests", type=int, default=8,
                       help="Prompts run together in one batch (larger requests run in several batches).")
    group.add_argument("--inference-max-seq-length", type=int, default=2560,
                       help="Longest sequence (prompt + generated tokens) the KV cache holds.")
    group.add_argument("--max-tokens-to-oom", type=int, default=12000,
                       help="Refuse a batch whose prompts x longest sequence exceed this many tokens, before it "
                            "runs out of memory.")
    group.add_argument("--max-prompts-per-request", type=int, default=128,
                       help="Most prompts one request may carry (Megatron's limit is 128).")
    group.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024,
                       help="Larger request bodies are refused with HTTP 413.")
    group.add_argument("--decode-only-cuda-graphs", action="store_true",
                       help="Replay each decode step from a CUDA graph (one GPU; MoE layers need --moe-grouped-gemm "
                            "in bf16 on Hopper, dropless or padded routing; others decode eagerly with a warning).")
    group.add_argument("--inference-dynamic-batching", action="store_true",
                       help="Continuous batching: requests join the running batch (one rank only).")
    group.add_argument("--inference-dynamic-batching-block-size", type=int, default=256,
                       help="Positions per KV-cache block of dynamic batching.")
    group.add_argument("--inference-dynamic-batching-buffer-size-gb", type=float, default=40.0,
                       help="Memory of the paged KV cache of dynamic batching, in GB.")
    group.add_argument("--inference-dynamic-batching-max-tokens", type=int, default=2048,
                       help="Tokens one dynamic-batching step may feed (decode tokens + prompt chunks).")
    group.add_argument("--model-family", type=str, default=None, choices=["gpt", "hybrid", "bert"],
                       help="Model to build (default: hybrid for any hybrid layout flag, else gpt). A bert model "
                            "is served for scoring and fill-mask (PUT /api with tokens_to_generate 0, POST "
                            "/fill-mask), not generation.")
    group.add_argument("--embedding-pooling", type=str, default="mean", choices=["mean", "cls", "pooler"],
                       help="--model-family bert: how POST /v1/embeddings pools the last hidden states (mean over "
                            "the tokens, as sentence-transformers' mean pooling; the [CLS] state; or the pooler's "
                            "output).")
    group.add_argument("--embedding-normalize", action=argparse.BooleanOptionalAction, default=True,
                       help="--model-family bert: L2-normalize the embeddings.")
    group.add_argument("--served-model-name", type=str, default=None,
                       help="Model id of the OpenAI-compatible routes (default: the --load directory's name).")
    return parser


def check_text_generate_args(args: argparse.Namespace) -> None:
    """Refuse impossible serving limits, naming the flag."""
    for flag in ("inference_max_requests", "inference_max_seq_length", "max_tokens_to_oom",
                 "max_prompts_per_request", "max_request_body_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.inference_dynamic_batching and args.world_size > 1:
        raise ValueError("--inference-dynamic-batching runs on one rank for now: drop it, or serve with "
                         "tensor and pipeline parallel sizes 1")
    if args.inference_dynamic_batching_block_size < 1 or args.inference_dynamic_batching_max_tokens < 1:
        raise ValueError("--inference-dynamic-batching-block-size and --inference-dynamic-batching-max-tokens "
                         "must be >= 1")
    if getattr(args, "model_family", None) == "bert":
        for flag in ("inference_dynamic_batching", "decode_only_cuda_graphs"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} does not apply to --model-family bert (a BERT model "
                                 "scores in one forward per batch; it does not decode): drop it")
    if args.max_batch_size is not None:
        raise ValueError("--max-batch-size is deprecated and not supported: use --inference-max-requests")
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise ValueError("the text generation server does not support the interleaved pipeline schedule: "
                         "drop --num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank")
    if getattr(args, "data_parallel_size", 1) != 1:
        raise ValueError(
            f"the text generation server runs one model replica: world size {args.world_size} must equal "
            "--tensor-model-parallel-size x --pipeline-model-parallel-size (data-parallel size 1)"
        )
