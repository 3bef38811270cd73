"""This rank's model for serving: built from the command line, weights from --load.

Any checkpoint this project saves loads into any serving layout (tensor/pipeline sizes
may differ from training's: the checkpoint loader reshards). Hugging Face models are
served after ``tools/checkpoint/convert.py --loader hf`` has written them as a checkpoint.
The model family (GPT, a Mamba/hybrid stack, or BERT) comes from --model-family, else from
the hybrid layout flags (on the command line, or in the checkpoint's arguments with
--use-checkpoint-args); GPT otherwise.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from megatron.core import parallel_state
from megatron.training.checkpointing import load_checkpoint
from megatron.training.model_setup import get_model

logger = logging.getLogger(__name__)


def is_hybrid_model(args) -> bool:
    """The flags describe a Mamba/hybrid model: --is-hybrid-model, --hybrid-layer-pattern or
    the older --hybrid-override-pattern / --hybrid-attention-ratio / --hybrid-mlp-ratio
    (with --use-checkpoint-args, as the checkpoint saved them)."""
    return bool(args.is_hybrid_model or args.hybrid_layer_pattern or args.hybrid_override_pattern
                or args.hybrid_attention_ratio or args.hybrid_mlp_ratio)


def model_family(args) -> str:
    """"gpt", "hybrid" or "bert": --model-family where given, else "hybrid" for any hybrid
    layout flag and "gpt" otherwise."""
    family = getattr(args, "model_family", None)
    if family is None:
        return "hybrid" if is_hybrid_model(args) else "gpt"
    if family != "hybrid" and is_hybrid_model(args):
        raise ValueError(f"--model-family {family} contradicts the hybrid layout flags (--is-hybrid-model, "
                         "--hybrid-layer-pattern, ...): drop one of them")
    return family


def model_provider_for(args) -> Callable:
    """The model provider of the family ``args`` describe (``model_family``): the training
    script's own (pretrain_gpt, pretrain_hybrid, pretrain_bert), so that the served model is
    built exactly as it was trained."""
    family = model_family(args)
    if family == "hybrid":
        from pretrain_hybrid import model_provider
    elif family == "bert":
        import pretrain_bert

        # An imported headless BertModel (a sentence-embedding model) has no heads to build.
        headless = pretrain_bert.imports_headless_bert(args)
        model_provider = pretrain_bert.headless_model_provider if headless else pretrain_bert.model_provider
    else:
        from pretrain_gpt import model_provider
    return model_provider


class _NoOptimizer:
    """Stands in for the optimizer at load time: serving keeps no optimizer state."""

    def reload_model_params(self) -> None:
        pass


def load_model_for_inference(model_provider: Callable, args) -> torch.nn.Module:
    """The model of this rank (one chunk), in eval mode and in --bf16 / --fp16 precision."""
    groups = parallel_state.get_process_groups()
    chunks = get_model(model_provider, groups, wrap_with_ddp=False)
    if len(chunks) != 1:
        raise ValueError("the text generation server needs one model chunk per rank: drop the virtual pipeline flags")
    if args.load:
        load_checkpoint(chunks, _NoOptimizer(), None, args, groups)
    else:
        logger.warning("no --load given: serving randomly initialized weights")
    model = chunks[0]
    if args.bf16:
        model = model.to(torch.bfloat16)
    elif args.fp16:
        model = model.to(torch.float16)
    return model.eval()
