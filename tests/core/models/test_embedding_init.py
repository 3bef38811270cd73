"""--embedding-init-method-std: the embeddings draw from their own normal initializer, the
other weights keep --init-method-std; without it the embeddings use init_method as before."""

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import core_transformer_config_from_args


def _model(**config_overrides):
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
        activation_func=F.gelu, use_cpu_initialization=True, **config_overrides)
    torch.manual_seed(0)
    return GPTModel(config, vocab_size=256, max_sequence_length=128, position_embedding_type="learned_absolute",
                    share_embeddings_and_output_weights=False)


def test_embeddings_get_their_own_std():
    model = _model(embedding_init_method_std=0.5)
    for weight in (model.embedding.word_embeddings.weight, model.embedding.position_embeddings.weight):
        assert abs(float(weight.detach().std()) - 0.5) < 0.05
    fc1 = model.decoder.layers[0].mlp.linear_fc1.weight
    assert abs(float(fc1.detach().std()) - 0.02) < 0.003
    assert abs(float(model.output_layer.weight.detach().std()) - 0.02) < 0.003


def test_default_keeps_init_method_for_the_embeddings():
    config = _model().config
    assert config.embedding_init_method is config.init_method
    assert abs(float(_model().embedding.word_embeddings.weight.detach().std()) - 0.02) < 0.003


def test_flag_reaches_the_config():
    args = parse_and_validate(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                               "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
                               "--train-iters", "1", "--embedding-init-method-std", "0.1"])
    args.params_dtype = torch.float32
    assert core_transformer_config_from_args(args).embedding_init_method_std == 0.1
