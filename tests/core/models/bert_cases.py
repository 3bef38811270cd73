"""Tiny random Hugging Face BERT models and the matching BertModel, for parity tests."""

from __future__ import annotations

import torch

from megatron.core.models.bert import BertModel
from megatron.core.models.bert.hf_mapping import bert_kwargs_from_hf_config, hf_to_megatron, shape_for
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ, HIDDEN, HEADS, LAYERS = 128, 16, 64, 4, 2
# Larger than HF's 0.02 so that activations reach the range where mistakes show clearly.
INIT_STD = 0.1


def hf_model(arch: str = "BertForPreTraining", seed: int = 0, hidden_act: str = "gelu"):
    """A random HF BERT of ``arch`` (fp32, eval, no dropout). 1-D parameters (norms,
    biases) are perturbed so that a wrong mapping of them shows."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=128, max_position_embeddings=SEQ, type_vocab_size=2, hidden_act=hidden_act,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=INIT_STD,
        architectures=[arch],
    )
    model = getattr(transformers, arch)(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def megatron_model(hf, attention_backend: str = "sdpa", config_overrides=None):
    """The BertModel equal to ``hf`` (weights through hf_to_megatron), in eval mode."""
    arch, config_kwargs, model_kwargs = bert_kwargs_from_hf_config(hf.config.to_dict())
    config_kwargs.update(config_overrides or {})
    config = TransformerConfig(attention_backend=attention_backend, use_cpu_initialization=True, **config_kwargs)
    model = BertModel(config, **model_kwargs).eval()
    shape = shape_for(arch, config.num_layers, config.num_attention_heads, config.kv_channels)
    model.load_state_dict(hf_to_megatron(hf.state_dict(), shape), strict=True)
    return model, shape


def batch(seed: int = 1):
    """input_ids, token types and a padding mask (second row padded after 10 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    types = torch.zeros(2, SEQ, dtype=torch.long)
    types[:, SEQ // 2:] = 1
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 10:] = 0
    return ids, types, mask
