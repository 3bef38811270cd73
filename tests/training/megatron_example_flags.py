"""The flag sets of Megatron-LM's own example launch scripts, as data.

Each entry holds the flags its script passes to ``pretrain_gpt.py`` (or, with ``entry``
"bert", ``pretrain_bert.py``) with the script's own values
(written from the scripts' documented contents, grouped as the scripts group them), and says how
the CI run changes it: ``sizes`` replaces model, batch, schedule and parallel sizes; ``paths``
replaces data, tokenizer, checkpoint and log locations (``{tmp}`` is the test's scratch folder);
``dropped`` removes options that need a GPU, each with the reason. Every other flag runs exactly
as the script has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[2]
GPT2_VOCAB = str(REPO / "examples" / "data" / "gpt2" / "vocab.json")
GPT2_MERGES = str(REPO / "examples" / "data" / "gpt2" / "merges.txt")

# Reasons for dropping or adding a flag on CPU.
FP8_ON_CPU = ("a CPU has no FP8 matmuls: --fp8-emulation runs the same recipe (scales, amax history, "
              "quantization) with fp32 matmuls")

RAMPUP_WITH_ITERS = ("Megatron-LM refuses --rampup-batch-size with --train-iters too; the ramp-up needs "
                     "sample-based training (--train-samples)")

# The options a CPU test run adds: Megatron's scripts launch on GPUs with NCCL, and the test's
# rank processes are daemonic, so they cannot start data-loader worker processes (the scripts'
# --num-workers is a throughput setting; loading in the main process reads the same batches).
CPU_RUNTIME = ["--distributed-backend", "gloo", "--use-cpu-initialization", "--num-workers", "0"]


@dataclass
class ExampleScript:
    """One Megatron example script's ``pretrain_<entry>.py`` flags and its CPU adaptation."""

    flags: List[str]
    sizes: Dict[str, List[str]]
    paths: Dict[str, List[str]] = field(default_factory=dict)
    dropped: Dict[str, Tuple[int, str]] = field(default_factory=dict)  # flag -> (n values, reason)
    added: Dict[str, Tuple[List[str], str]] = field(default_factory=dict)  # flag -> (values, reason)
    world_size: int = 1
    entry: str = "gpt"  # the pretrain script it launches: "gpt" or "bert"


def _split(text: str) -> List[str]:
    return text.split()


GPT3_175B = ExampleScript(
    # examples/gpt3/train_gpt3_175b_distributed.sh
    flags=_split(
        "--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 "
        "--max-position-embeddings 2048 --attention-backend auto "
        "--micro-batch-size 1 --global-batch-size 1536 --rampup-batch-size 16 16 5859375 "
        "--train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 "
        "--init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine "
        "--min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000 "
        "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 "
        "--data-path DATA --vocab-file VOCAB --merge-file MERGES --split 949,50,1 "
        "--log-interval 100 --save-interval 10000 --eval-interval 1000 --save CKPT --load CKPT "
        "--eval-iters 10 --tensorboard-dir TB"),
    sizes={
        "--num-layers": ["2"], "--hidden-size": ["64"], "--num-attention-heads": ["4"],
        "--seq-length": ["32"], "--max-position-embeddings": ["32"],
        "--global-batch-size": ["4"], "--train-iters": ["3"], "--lr-decay-iters": ["3"],
        "--tensor-model-parallel-size": ["1"], "--pipeline-model-parallel-size": ["2"],
        "--log-interval": ["1"], "--save-interval": ["1000"], "--eval-interval": ["2"], "--eval-iters": ["1"],
    },
    paths={
        "--data-path": ["--mock-data"], "--vocab-file": ["--vocab-file", GPT2_VOCAB],
        "--merge-file": ["--merge-file", GPT2_MERGES], "--save": ["--save", "{tmp}/ckpt"],
        "--load": ["--load", "{tmp}/ckpt"], "--tensorboard-dir": ["--tensorboard-dir", "{tmp}/tb"],
    },
    dropped={
        # Megatron-LM's own argument checks refuse a batch-size ramp-up with iteration-based
        # training ("expected no batch-size rampup for iteration-based training"), so the script
        # fails there as written; this framework refuses it with the same rule.
        "--rampup-batch-size": (3, RAMPUP_WITH_ITERS),
    },
    added={
        # fp16's dynamic loss scale starts at 2**32 and halves on every overflow, so a real run
        # skips its first ~20 steps; a 3-iteration run would skip them all and train nothing.
        "--initial-loss-scale": (["4096"], "a 3-iteration run cannot wait out the 2**32 start's back-off"),
    },
    world_size=2,
)

LLAMA3_8B_FP8 = ExampleScript(
    # examples/llama/train_llama3_8b_h100_fp8.sh, mock-data branch
    flags=_split(
        "--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 "
        "--num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128 "
        "--seq-length 8192 --max-position-embeddings 8192 --position-embedding-type rope "
        "--rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 "
        "--swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p "
        "--untie-embeddings-and-output-weights --disable-bias-linear "
        "--micro-batch-size 1 --global-batch-size 128 --train-samples 1953125000 "
        "--lr-decay-samples 1949218748 --lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001 "
        "--decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine --clip-grad 1.0 "
        "--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16 "
        "--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc "
        "--empty-unused-memory-level 1 --exit-duration-in-mins 235 "
        "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
        "--fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max --fp8-param-gather "
        "--tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel "
        "--mock-data --tokenizer-type NullTokenizer --vocab-size 128256 --data-cache-path CACHE "
        "--tiktoken-pattern v2 --split 99,1,0 --no-create-attention-mask-in-dataloader "
        "--no-mmap-bin-files --num-workers 1 "
        "--log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput "
        "--profile --profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist "
        "--distributed-timeout-minutes 60 --save CKPT --load CKPT --tensorboard-dir TB"),
    sizes={
        "--num-layers": ["2"], "--hidden-size": ["64"], "--ffn-hidden-size": ["128"],
        "--num-attention-heads": ["4"], "--num-query-groups": ["2"], "--kv-channels": ["16"],
        "--seq-length": ["32"], "--max-position-embeddings": ["32"],
        "--global-batch-size": ["2"], "--train-samples": ["6"], "--lr-decay-samples": ["6"],
        "--lr-warmup-samples": ["2"], "--vocab-size": ["512"],
        "--eval-iters": ["1"], "--eval-interval": ["2"],
        "--profile-step-start": ["1"], "--profile-step-end": ["2"],
    },
    paths={
        "--data-cache-path": ["--data-cache-path", "{tmp}/cache"], "--save": ["--save", "{tmp}/ckpt"],
        "--load": ["--load", "{tmp}/ckpt"], "--tensorboard-dir": ["--tensorboard-dir", "{tmp}/tb"],
    },
    added={"--fp8-emulation": ([], FP8_ON_CPU)},
)

MIXTRAL_8X7B = ExampleScript(
    # examples/mixtral/train_mixtral_8x7b_distributed.sh
    flags=_split(
        "--use-mcore-models --disable-bias-linear --seq-length 4096 --max-position-embeddings 32768 "
        "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
        "--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm "
        "--position-embedding-type rope --swiglu --untie-embeddings-and-output-weights "
        "--group-query-attention --num-query-groups 8 --no-masked-softmax-fusion --no-position-embedding "
        "--rotary-base 1000000 "
        "--num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss "
        "--moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall "
        "--overlap-param-gather --overlap-grad-reduce "
        "--tokenizer-type Llama2Tokenizer --tokenizer-model TOKENIZER --data-path DATA --split 99990,8,2 "
        "--micro-batch-size 1 --global-batch-size 256 --lr 1e-4 --train-iters 500000 "
        "--lr-decay-iters 320000 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1 "
        "--lr-warmup-iters 500 --clip-grad 1.0 --bf16 "
        "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --expert-model-parallel-size 8 "
        "--use-distributed-optimizer --sequence-parallel "
        "--log-interval 1 --save-interval 10000 --eval-interval 1000 --eval-iters 10 "
        "--save CKPT --load CKPT --tensorboard-dir TB --no-load-optim --no-load-rng"),
    sizes={
        "--seq-length": ["32"], "--max-position-embeddings": ["64"], "--num-layers": ["2"],
        "--hidden-size": ["64"], "--ffn-hidden-size": ["128"], "--num-attention-heads": ["4"],
        "--num-query-groups": ["2"], "--num-experts": ["4"],
        "--global-batch-size": ["4"], "--train-iters": ["3"], "--lr-decay-iters": ["3"],
        "--lr-warmup-iters": ["1"], "--pipeline-model-parallel-size": ["1"],
        "--expert-model-parallel-size": ["2"],
        "--save-interval": ["1000"], "--eval-interval": ["2"], "--eval-iters": ["1"],
    },
    paths={
        # The script's SentencePiece model is a file the user supplies; the CI run has none, so it
        # uses the tokenizer that needs no file (mock data ignores the vocabulary anyway).
        "--tokenizer-type": ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512"],
        "--tokenizer-model": [], "--data-path": ["--mock-data"],
        "--save": ["--save", "{tmp}/ckpt"], "--load": ["--load", "{tmp}/ckpt"],
        "--tensorboard-dir": ["--tensorboard-dir", "{tmp}/tb"],
    },
    world_size=2,
)

BERT_340M = ExampleScript(
    # examples/bert/train_bert_340m_distributed.sh (BERT-large); it repeats --weight-decay and
    # --clip-grad, which parse to the same values.
    flags=_split(
        "--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 512 "
        "--max-position-embeddings 512 --attention-backend auto "
        "--micro-batch-size 4 --global-batch-size 32 --train-iters 1000000 --weight-decay 1e-2 "
        "--clip-grad 1.0 --fp16 --lr 0.0001 --lr-decay-iters 990000 --lr-decay-style linear "
        "--min-lr 1.0e-5 --weight-decay 1e-2 --lr-warmup-fraction .01 --clip-grad 1.0 "
        "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 "
        "--data-path DATA --vocab-file VOCAB --split 949,50,1 "
        "--log-interval 100 --save-interval 10000 --eval-interval 1000 --save CKPT --load CKPT "
        "--eval-iters 10 --tensorboard-dir TB"),
    sizes={
        "--num-layers": ["2"], "--hidden-size": ["64"], "--num-attention-heads": ["4"],
        "--seq-length": ["32"], "--max-position-embeddings": ["32"],
        "--micro-batch-size": ["2"], "--global-batch-size": ["4"], "--train-iters": ["3"],
        "--lr-decay-iters": ["3"], "--tensor-model-parallel-size": ["1"], "--pipeline-model-parallel-size": ["2"],
        "--log-interval": ["1"], "--save-interval": ["1000"], "--eval-interval": ["2"], "--eval-iters": ["1"],
    },
    paths={
        # The test writes a small WordPiece vocabulary there (mock data draws from it).
        "--data-path": ["--mock-data"], "--vocab-file": ["--vocab-file", "{tmp}/vocab.txt"],
        "--save": ["--save", "{tmp}/ckpt"], "--load": ["--load", "{tmp}/ckpt"],
        "--tensorboard-dir": ["--tensorboard-dir", "{tmp}/tb"],
    },
    added={
        "--initial-loss-scale": (["4096"], "a 3-iteration run cannot wait out the 2**32 start's back-off"),
        # A vocabulary file alone does not say lower- or mixed-case WordPiece.
        "--tokenizer-type": (["BertWordPieceLowerCase"], "the script gives --vocab-file without --tokenizer-type"),
    },
    world_size=2,
    entry="bert",
)

EXAMPLES = {"gpt3_175b": GPT3_175B, "llama3_8b_fp8": LLAMA3_8B_FP8, "mixtral_8x7b": MIXTRAL_8X7B,
            "bert_340m": BERT_340M}


def _is_flag(token: str) -> bool:
    return token.startswith("--")


def _groups(flags: List[str]) -> List[Tuple[str, List[str]]]:
    """[(flag, its values)] in order."""
    out: List[Tuple[str, List[str]]] = []
    for token in flags:
        if _is_flag(token):
            out.append((token, []))
        else:
            out[-1][1].append(token)
    return out


def scaled_argv(script: ExampleScript, tmp: str) -> List[str]:
    """The script's flags with sizes, paths and dropped options applied, plus the CPU runtime."""
    argv: List[str] = []
    for flag, values in _groups(script.flags):
        if flag in script.dropped:
            continue
        if flag in script.paths:
            argv += [v.replace("{tmp}", tmp) for v in script.paths[flag]]
        elif flag in script.sizes:
            argv += [flag] + script.sizes[flag]
        else:
            argv += [flag] + values
    for flag, (values, _reason) in script.added.items():
        argv += [flag] + values
    return argv + CPU_RUNTIME
