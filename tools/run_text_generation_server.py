"""Serve a GPT or Mamba/hybrid checkpoint over HTTP: Megatron's PUT /api and POST
/completions, plus the OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models
and /health. With --model-family bert, a BERT checkpoint is served for scoring (PUT /api
with tokens_to_generate 0), POST /fill-mask and POST /v1/embeddings.

    torchrun --nproc-per-node <TP x PP> tools/run_text_generation_server.py \\
        <model flags> --load CKPT [--use-checkpoint-args] <tokenizer flags> --port 5000

The first rank (pipeline stage 0, tensor-parallel rank 0) serves HTTP; the other ranks
follow its broadcasts and exit when it stops (Ctrl-C / SIGTERM). With --prompts the
prompts are generated once, printed, and the script exits. See docs/inference.md.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from megatron.core.inference import (  # noqa: E402
    DynamicInferenceEngine,
    InferenceRequest,
    SamplingParams,
    StaticInferenceEngine,
)
from megatron.core.inference.engines.encoder_engine import EncoderEngine, MaskedLMRequest  # noqa: E402
from megatron.inference.dynamic_service import DynamicGenerationService  # noqa: E402
from megatron.inference.encoder_service import EncoderService, special_token_ids  # noqa: E402
from megatron.inference.model_loading import load_model_for_inference, model_family, model_provider_for  # noqa: E402
from megatron.inference.rank_roles import Leader, follow, ignore_stop_signals  # noqa: E402
from megatron.inference.server_args import add_text_generate_args, check_text_generate_args  # noqa: E402
from megatron.inference.text_service import ServingLimits, TextGenerationService  # noqa: E402
from megatron.training import get_tokenizer  # noqa: E402
from megatron.training.arguments import parse_args  # noqa: E402
from megatron.training.initialize import initialize_megatron, shutdown_megatron  # noqa: E402

logger = logging.getLogger("run_text_generation_server")


def _max_sequence_length(args) -> int:
    if args.position_embedding_type == "learned_absolute":
        # Learned positions end at --max-position-embeddings.
        return min(args.inference_max_seq_length, args.max_position_embeddings)
    return args.inference_max_seq_length


def _kv_blocks(args, model, block_size: int) -> int:
    """Blocks of --inference-dynamic-batching-buffer-size-gb for this model's KV cache."""
    config = model.config
    itemsize = next(model.parameters()).element_size()
    per_block = 2 * config.num_layers * block_size * config.num_query_groups * config.kv_channels * itemsize
    return max(1, int(args.inference_dynamic_batching_buffer_size_gb * 1024**3 // per_block))


def _encoder_engine(args, model, tokenizer) -> EncoderEngine:
    cls, sep, mask, pad = special_token_ids(tokenizer)
    return EncoderEngine(model, args.inference_max_requests, _max_sequence_length(args), mask_id=mask, pad_id=pad,
                          vocab_size=tokenizer.vocab_size, special_ids=(cls, sep, pad))


def _engine(args, model, tokenizer):
    if model_family(args) == "bert":
        return _encoder_engine(args, model, tokenizer)
    common = dict(vocab_size=tokenizer.vocab_size, detokenize=tokenizer.detokenize)
    if args.inference_dynamic_batching:
        block = args.inference_dynamic_batching_block_size
        return DynamicInferenceEngine(model, args.inference_max_requests, _kv_blocks(args, model, block), block,
                                      args.inference_dynamic_batching_max_tokens, _max_sequence_length(args), **common)
    return StaticInferenceEngine(model, args.inference_max_requests, _max_sequence_length(args),
                                 use_cuda_graphs=args.decode_only_cuda_graphs, **common)


def _score_prompts(args, engine: EncoderEngine, tokenizer) -> None:
    """--prompts with a BERT model: each prompt's pseudo-log-likelihood, and the five best
    fills of each [MASK]; a headless model prints each prompt's embedding (its size and first values)."""
    service = EncoderService(engine, tokenizer, ServingLimits(), pooling=args.embedding_pooling,
                             normalize=args.embedding_normalize)
    if not engine.has_lm_head:
        requests = [MaskedLMRequest(*service.encode(p)) for p in args.prompts]
        vectors = engine.embed(requests, args.embedding_pooling, args.embedding_normalize)
        if args.rank == 0:
            for prompt, vector in zip(args.prompts, vectors):
                print(f"{prompt}\n  embedding: {len(vector)} values, first {vector[:4]}", flush=True)
        return
    requests = []
    for prompt in args.prompts:
        tokens, types = service.encode(prompt)
        requests.append(MaskedLMRequest(tokens, types, top_k=5, pseudo_log_likelihood=True))
    results = engine.score(requests)
    if args.rank == 0:
        for prompt, result in zip(args.prompts, results):
            print(f"{prompt}\n  pseudo-log-likelihood: {result.pseudo_log_likelihood:.4f}", flush=True)
            for position, candidates in sorted(result.mask_predictions.items()):
                fills = ", ".join(f"{tokenizer.detokenize([t])!r} {lp:.3f}" for t, lp in candidates)
                print(f"  [MASK] at {position}: {fills}", flush=True)


def _run_prompts(args, engine, tokenizer) -> None:
    if isinstance(engine, EncoderEngine):
        return _score_prompts(args, engine, tokenizer)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            return_log_probs=args.return_log_probs, num_tokens_to_generate=args.num_tokens_to_generate)
    requests = [InferenceRequest(tokenizer.tokenize(p), params) for p in args.prompts]
    results = engine.generate(requests)
    if args.rank == 0:
        for prompt, result in zip(args.prompts, results):
            print(tokenizer.detokenize(result.prompt_tokens + result.generated_tokens), flush=True)
            if args.return_log_probs:
                print(f"  log-probs: {result.generated_log_probs}", flush=True)


def _serve(args, engine, tokenizer) -> None:
    import uvicorn

    from megatron.inference.app import build_app
    from megatron.inference.encoder_api import build_encoder_app

    limits = ServingLimits(max_prompts=args.max_prompts_per_request, max_sequence_length=engine.max_sequence_length,
                           max_tokens_to_oom=args.max_tokens_to_oom, max_body_bytes=args.max_request_body_bytes)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.load)) if args.load else "megatron")
    leader = Leader() if args.world_size > 1 else None
    app_for = build_app
    if isinstance(engine, EncoderEngine):
        service = EncoderService(engine, tokenizer, limits, model_name=name, leader=leader,
                                 pooling=args.embedding_pooling, normalize=args.embedding_normalize)
        app_for = build_encoder_app
    elif args.inference_dynamic_batching:
        service = DynamicGenerationService(engine, tokenizer, limits, model_name=name)
    else:
        service = TextGenerationService(engine, tokenizer, limits, model_name=name, leader=leader)
    # uvicorn handles SIGINT/SIGTERM while it serves, then restores the previous handlers and
    # raises the signal again: ignored, so that this rank stops the followers and shuts down
    # with them instead of dying on the spot.
    ignore_stop_signals()
    try:
        logger.info("serving on http://%s:%d", args.host, args.port)
        uvicorn.run(app_for(service), host=args.host, port=args.port, log_level="info")
    finally:
        if leader is not None:
            leader.shutdown()


def main(argv=None) -> None:
    args = parse_args(add_text_generate_args, args=argv)
    # Megatron forces these for serving: weights only, and a missing checkpoint is an error.
    args.no_load_rng, args.no_load_optim, args.exit_on_missing_checkpoint = True, True, True
    # Generation takes its batch from requests; the training batch flags only need a value.
    args = initialize_megatron(parsed_args=args, args_defaults={"micro_batch_size": 1})
    check_text_generate_args(args)
    model = load_model_for_inference(model_provider_for(args), args)
    tokenizer = get_tokenizer()
    engine = _engine(args, model, tokenizer)
    try:
        if args.prompts:
            _run_prompts(args, engine, tokenizer)
        elif not dist.is_initialized() or dist.get_rank() == 0:
            _serve(args, engine, tokenizer)
        else:
            follow(engine)
    finally:
        shutdown_megatron()


if __name__ == "__main__":
    main()
