"""Generation speed: prefill and decode tokens/s and ms per decode step, ours against Hugging
Face ``transformers`` ``generate`` on the same weights, in the same process.

Usage (one GPU, bf16, the llama-1.6b reference shape of DESIGN.md section 5):
    python benchmarks/generation_bench.py [--batch-sizes 1 8 32 128] [--prompt-len 128]
        [--new-tokens 128] [--no-hf] [--no-hf-compile] [--shape tiny --device cpu --dtype fp32]
        [--profile-decode] [--gemv]

Rows per batch size:
- ``ours eager``: StaticInferenceEngine, greedy, the reference path;
- ``ours cuda-graphs``: the same with each decode step replayed from a CUDA graph;
- ``ours graphs+compile``: the graph captures the decode step compiled by ``torch.compile``;
- ``hf dynamic``: ``generate`` with its default dynamic cache;
- ``hf static+compile``: ``generate`` with ``cache_implementation="static"``, for which
  transformers compiles its decode step with CUDA graphs itself (its documented fast path).
Prefill time is one forward over the prompts (ours: into a fresh KV cache; HF: with
``use_cache=True``); decode time is the rest of a full generate call, divided by the
new tokens after the first. Every timing is the best of ``--repeats`` after a warm-up.
Ours and HF must produce the same greedy tokens in fp32; in bf16 they may drift apart after
a few tokens (different operation order), which does not change the timing.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron.core.inference.cuda_graphs import DecodeGraph  # noqa: E402
from megatron.core.inference import InferenceRequest, SamplingParams, StaticInferenceContext, StaticInferenceEngine  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.hf_mapping import gpt_kwargs_from_hf_config, hf_to_megatron, shape_from_kwargs  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

SHAPES = {
    # DESIGN.md section 5: 24L, h2048, 16 heads, GQA 4 groups, SwiGLU 5632, RMSNorm, RoPE, untied, vocab 131072
    "llama-1.6b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                       intermediate_size=5632, vocab_size=131072, max_position_embeddings=4096),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=512),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_models(shape: str, dtype: torch.dtype, device: torch.device):
    """(HF LlamaForCausalLM, our GPTModel) with the same random weights."""
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
                                         **SHAPES[shape])
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    hf = hf.to(device).eval()
    arch, config_kwargs, model_kwargs = gpt_kwargs_from_hf_config(hf.config.to_dict())
    # The weights come from the HF model: skip drawing initial ones.
    config = TransformerConfig(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                               use_cpu_initialization=True, perform_initialization=False, **config_kwargs)
    ours = GPTModel(config, **model_kwargs)
    ours.load_state_dict(hf_to_megatron(hf.state_dict(), arch, shape_from_kwargs(config_kwargs, model_kwargs)))
    return hf, ours.to(device=device, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (compilation, graph capture, allocator)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def time_ours(model, prompts: torch.Tensor, new_tokens: int, cuda_graphs: bool, repeats: int, compile_decode=False):
    batch, prompt_len = prompts.shape
    engine = StaticInferenceEngine(model, batch, prompt_len + new_tokens, use_cuda_graphs=cuda_graphs,
                                   compile_decode=compile_decode)
    requests = [InferenceRequest(p.tolist(), SamplingParams(top_k=1, num_tokens_to_generate=new_tokens)) for p in prompts]
    positions = torch.arange(prompt_len, device=prompts.device).expand(batch, -1)

    def prefill():
        context = StaticInferenceContext(batch, prompt_len + new_tokens)
        context.materialize_only_last_token_logits = True
        model(prompts, positions, None, inference_context=context)

    outputs = []
    prefill_s = best_time(prefill, prompts.device, repeats)
    total_s = best_time(lambda: outputs.append(engine.generate(requests)), prompts.device, repeats)
    return prefill_s, total_s, [r.generated_tokens for r in outputs[-1]]


@torch.no_grad()
def time_hf(hf, prompts: torch.Tensor, new_tokens: int, static_compile: bool, repeats: int):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if static_compile:
        kwargs["cache_implementation"] = "static"
    outputs = []
    prefill_s = best_time(lambda: hf(prompts, use_cache=True, logits_to_keep=1), prompts.device, repeats)
    total_s = best_time(lambda: outputs.append(hf.generate(prompts, **kwargs)), prompts.device, repeats)
    return prefill_s, total_s, outputs[-1][:, prompts.shape[1]:].tolist()


@torch.no_grad()
def profile_decode(model, prompts: torch.Tensor) -> None:
    """Kernels of one eager decode step after a prefill: how many, their summed time, the top ones."""
    from torch.profiler import ProfilerActivity, profile

    batch, prompt_len = prompts.shape
    context = StaticInferenceContext(batch, prompt_len + 8)
    context.materialize_only_last_token_logits = True
    model(prompts, torch.arange(prompt_len, device=prompts.device).expand(batch, -1), None, inference_context=context)
    context.increment(prompt_len)
    step_tokens = prompts[:, -1:].clone()
    positions = torch.full((batch, 1), prompt_len, device=prompts.device)
    model(step_tokens, positions, None, inference_context=context)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(step_tokens, positions, None, inference_context=context)
        torch.cuda.synchronize()
    _print_kernels(prof, f"eager decode step, batch {batch}")
    context.use_fixed_shapes(prompts.device)
    graph = DecodeGraph(model, context, step_tokens, positions, compile_step=True)
    graph(step_tokens, positions)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph(step_tokens, positions)
        torch.cuda.synchronize()
    _print_kernels(prof, f"compiled decode graph replay, batch {batch}")
    replays = 100
    start = time.perf_counter()
    for _ in range(replays):
        graph.graph.replay()
    torch.cuda.synchronize()
    print(f"compiled decode graph replayed alone, batch {batch}: "
          f"{1000 * (time.perf_counter() - start) / replays:.3f} ms per step", flush=True)


@torch.no_grad()
def gemv_table(shape: str, dtype: torch.dtype, batch_sizes) -> None:
    """The decode step's matrix products at its shapes (each weight matrix of the model, and
    the output layer) inside a CUDA graph of back-to-back calls on distinct weights, so
    neither launches nor L2 hits flatter the figure: microseconds per call and the weight
    bytes read per second. ``F.linear`` (cuBLAS, what the model runs) at every batch size;
    at batch 1 also ``torch.mv`` (cuBLAS's matrix-vector path) and the Triton candidate of
    ``gemv_triton.py`` at a few tile heights, each checked against ``F.linear`` first."""
    import torch.nn.functional as F

    from gemv_triton import gemv

    cfg = SHAPES[shape]
    h, ffn, heads, groups = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                             cfg["num_key_value_heads"])
    qkv = h + 2 * h // heads * groups
    matrices = {"qkv": (qkv, h), "attention out": (h, h), "fc1 (gate+up)": (2 * ffn, h), "fc2": (h, ffn),
                "output layer": (cfg["vocab_size"], h)}
    print(f"{'matrix':<14} | {'N x K':>13} | {'batch':>5} | {'implementation':<26} | {'us/call':>8} | {'GB/s':>6}")
    for name, (n, k) in matrices.items():
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(max(2, min(50, 2**31 // (n * k * 2))))]
        for m in batch_sizes:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            impls = {"F.linear": lambda w: F.linear(x, w)}
            if m == 1:
                impls["torch.mv"] = lambda w: torch.mv(w, x[0])
                for block_n, block_k, warps in ((4, 512, 4), (8, 512, 4), (16, 256, 4), (32, 128, 4), (8, 1024, 8),
                                                (16, 512, 8)):
                    impls[f"triton gemv {block_n}x{block_k} w{warps}"] = (
                        lambda w, b=block_n, bk=block_k, nw=warps: gemv(x, w, block_n=b, block_k=bk, num_warps=nw))
            for impl, fn in impls.items():
                expected = F.linear(x, weights[0]).float().reshape(-1)
                torch.testing.assert_close(fn(weights[0]).float().reshape(-1), expected, atol=0.5, rtol=2e-2)
                us = _graphed_us_per_call(fn, weights)
                print(f"{name:<14} | {f'{n} x {k}':>13} | {m:>5} | {impl:<26} | {us:>8.1f} | "
                      f"{n * k * weights[0].element_size() / us / 1e3:>6.0f}", flush=True)
        del weights


def _graphed_us_per_call(fn, weights) -> float:
    for w in weights:
        fn(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (10 * len(weights)) * 1e6


def _print_kernels(prof, what: str) -> None:
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    total_ms = sum(e.device_time for e in kernels) / 1000
    print(f"{what}: {len(kernels)} kernels, {total_ms:.3f} ms of kernel time", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)


def row(name: str, batch: int, prompt_len: int, new_tokens: int, prefill_s: float, total_s: float) -> dict:
    decode_s = max(total_s - prefill_s, 1e-9)
    steps = max(new_tokens - 1, 1)  # the first new token comes from the prefill
    return {"impl": name, "batch": batch, "prefill_tok_s": batch * prompt_len / prefill_s,
            "decode_tok_s": batch * steps / decode_s, "ms_per_step": 1000 * decode_s / steps}


def _line(r: dict) -> str:
    return (f"{r['batch']:>5} | {r['impl']:<18} | {r['prefill_tok_s']:>13,.0f} | {r['decode_tok_s']:>12,.0f} | "
            f"{r['ms_per_step']:>8.2f}")


def print_table(rows) -> None:
    print(f"{'batch':>5} | {'implementation':<18} | {'prefill tok/s':>13} | {'decode tok/s':>12} | {'ms/step':>8}")
    print("-" * 70)
    for r in rows:
        print(_line(r))


def _environment(device: torch.device) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" else ""
    return f"device {name}; torch {torch.__version__}{cuda}; transformers {transformers.__version__}"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1.6b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="time ours only")
    parser.add_argument("--no-hf-compile", action="store_true", help="skip HF's static cache + torch.compile row")
    parser.add_argument("--profile-decode", action="store_true",
                        help="print the kernels of one eager decode step and of the compiled decode graph at each "
                             "batch size (count and time), and the graph's time replayed alone")
    parser.add_argument("--gemv", action="store_true",
                        help="only time F.linear at the decode step's weight shapes (CUDA) for the batch sizes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(_environment(device), flush=True)
    if args.gemv:
        if device.type != "cuda":
            parser.error("--gemv times CUDA kernels: run it on a GPU (--device cuda)")
        gemv_table(args.shape, DTYPES[args.dtype], args.batch_sizes)
        return []
    print(f"shape {args.shape}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy", flush=True)
    hf, ours = build_models(args.shape, DTYPES[args.dtype], device)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, SHAPES[args.shape]["vocab_size"], (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch)).to(device)
        if args.profile_decode and device.type == "cuda":
            profile_decode(ours, prompts)
        runs = [("ours eager", lambda p=prompts: time_ours(ours, p, args.new_tokens, False, args.repeats))]
        if device.type == "cuda":
            runs.append(("ours cuda-graphs", lambda p=prompts: time_ours(ours, p, args.new_tokens, True, args.repeats)))
            runs.append(("ours graphs+compile",
                         lambda p=prompts: time_ours(ours, p, args.new_tokens, True, args.repeats, compile_decode=True)))
        if not args.no_hf:
            runs.append(("hf dynamic", lambda p=prompts: time_hf(hf, p, args.new_tokens, False, args.repeats)))
        tokens = {}
        for name, run in runs:
            prefill_s, total_s, tokens[name] = run()
            rows.append(row(name, batch, args.prompt_len, args.new_tokens, prefill_s, total_s))
            print(_line(rows[-1]), flush=True)
        for name in ("ours cuda-graphs", "ours graphs+compile"):
            if name in tokens and tokens[name] != tokens["ours eager"]:
                same = sum(a == b for x, y in zip(tokens[name], tokens["ours eager"]) for a, b in zip(x, y))
                print(f"WARNING batch {batch}: {name} tokens differ from eager tokens "
                      f"({same} of {batch * args.new_tokens} equal; bf16 rounding differs)", flush=True)
        if args.dtype == "fp32" and "hf dynamic" in tokens and tokens["hf dynamic"] != tokens["ours eager"]:
            print(f"WARNING batch {batch}: fp32 greedy tokens differ from transformers'", flush=True)
        if not args.no_hf and not args.no_hf_compile and device.type == "cuda":
            # transformers compiles its decode step itself for a static cache on CUDA (its
            # CompileConfig: fullgraph, CUDA graphs); a forward compiled here by hand with
            # mode="reduce-overhead" reads CUDA-graph outputs a later step has overwritten.
            prefill_s, total_s, _ = time_hf(hf, prompts, args.new_tokens, True, args.repeats)
            rows.append(row("hf static+compile", batch, args.prompt_len, args.new_tokens, prefill_s, total_s))
            print(_line(rows[-1]), flush=True)
    print()
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
