"""--yaml-cfg: Megatron's YAML config replaces the command line (sections, renamed fields,
environment variables), and a key that cannot be mapped is refused by name."""

import logging

import pytest

from megatron.training.arguments import parse_and_validate, parse_args

pytest.importorskip("yaml")

CONFIG = """
language_model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  ffn_hidden_size: null
  layernorm_epsilon: 1.e-6
  activation_func: swiglu
  num_moe_experts: null
  bias_activation_fusion: True
  init_method: null
model_parallel:
  tensor_model_parallel_size: 1
  bf16: True
  tp_comm_split_ag: True
  params_dtype: null
micro_batch_size: 2
global_batch_size: 8
seq_length: 32
max_position_embeddings: 32
lr: 2.5e-4
min_lr: 1e-5
train_iters: 5
rampup_batch_size: null
data_path: ${YAML_TEST_PREFIX}
split: '99,1,0'
use_legacy_models: False
"""


def _write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_replaces_the_command_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("YAML_TEST_PREFIX", "/data/a_text_document")
    path = _write(tmp_path, CONFIG)
    with caplog.at_level(logging.WARNING):
        args = parse_args(args=["--yaml-cfg", path, "--num-layers", "7"])
    assert (args.num_layers, args.hidden_size, args.micro_batch_size) == (2, 64, 2)
    assert "ignoring: --num-layers" in caplog.text  # the ignored command-line flag is named
    assert args.swiglu is True and args.bf16 is True
    assert args.norm_epsilon == 1e-6
    assert args.lr == 2.5e-4 and args.min_lr == 1e-5  # YAML reads 1e-5 as a string
    assert args.data_path == ["/data/a_text_document"]
    assert args.yaml_cfg == path
    validated = parse_and_validate(["--yaml-cfg", path])
    assert validated.ffn_hidden_size == parse_and_validate(
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
        "--micro-batch-size 2 --swiglu --bf16".split()).ffn_hidden_size


@pytest.mark.parametrize("line,key", [
    ("num_layer: 3", "num_layer"),                      # misspelled
    ("model_parallel:\n  timers: 7", "model_parallel.timers"),  # set by the framework
    ("activation_func: relu6", "activation_func"),
])
def test_unmappable_key_is_refused_by_name(tmp_path, line, key):
    path = _write(tmp_path, "num_layers: 2\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"--yaml-cfg {path}: key {key} = "):
        parse_args(args=["--yaml-cfg", path])


def test_refused_megatron_feature_in_yaml_is_refused_like_its_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("YAML_TEST_PREFIX", "/data/a_text_document")
    path = _write(tmp_path, CONFIG.replace("use_legacy_models: False", "logits_save_top_k: 5"))
    with pytest.raises(ValueError, match=r"^--logits-save-top-k '?5'?: is not supported"):
        parse_and_validate(["--yaml-cfg", path])


def test_missing_environment_variable_and_file_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("YAML_TEST_PREFIX", raising=False)
    with pytest.raises(ValueError, match=r"key data_path uses \$\{YAML_TEST_PREFIX\}"):
        parse_args(args=["--yaml-cfg", _write(tmp_path, CONFIG)])
    with pytest.raises(ValueError, match="is not an existing file"):
        parse_args(args=["--yaml-cfg", str(tmp_path / "nope.yaml")])
