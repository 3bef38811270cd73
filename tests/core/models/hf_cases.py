"""Tiny random Hugging Face models and the matching GPTModel, for parity tests."""

from __future__ import annotations

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.hf_mapping import gpt_kwargs_from_hf_config, hf_to_megatron, shape_from_kwargs
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ, HIDDEN, HEADS, LAYERS = 128, 32, 64, 4, 2
# Larger than HF's 0.02 so that activations reach the range where the functions under
# test differ (exact vs tanh GeLU differ by <1e-5 on logits at std 0.02, ~7e-4 at 0.1).
INIT_STD = 0.1


def hf_config(name: str):
    """The transformers config of case ``name`` (fp32, no dropout, eager attention)."""
    import transformers

    llama_like = dict(
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        initializer_range=INIT_STD,
    )
    gpt2 = dict(
        n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=0, eos_token_id=0, initializer_range=INIT_STD,
    )
    configs = {
        "gpt2": lambda: transformers.GPT2Config(activation_function="gelu", **gpt2),
        "gpt2_gelu_new": lambda: transformers.GPT2Config(activation_function="gelu_new", **gpt2),
        "llama": lambda: transformers.LlamaConfig(**llama_like),
        "llama31": lambda: transformers.LlamaConfig(
            rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            **llama_like,
        ),
        "mistral": lambda: transformers.MistralConfig(sliding_window=8, **llama_like),
        "qwen2": lambda: transformers.Qwen2Config(**llama_like),
    }
    config = configs[name]()
    config._attn_implementation = "eager"
    return config


def hf_model(name: str, seed: int = 0):
    """A random HF causal LM; 1-D parameters (norms, biases) are perturbed so that a wrong
    mapping of them shows (HF initializes biases to 0 and norm weights to 1)."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(name)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def megatron_model(hf, attention_backend: str = "sdpa", config_overrides=None, model_overrides=None):
    """The GPTModel equal to ``hf`` (weights through hf_to_megatron), in eval mode."""
    arch, config_kwargs, model_kwargs = gpt_kwargs_from_hf_config(hf.config.to_dict())
    config_kwargs.update(config_overrides or {})
    model_kwargs.update(model_overrides or {})
    config = TransformerConfig(attention_backend=attention_backend, use_cpu_initialization=True, **config_kwargs)
    model = GPTModel(config, **model_kwargs).eval()
    shape = shape_from_kwargs(config_kwargs, model_kwargs)
    model.load_state_dict(hf_to_megatron(hf.state_dict(), arch, shape), strict=True)
    return model, arch, shape


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)
