"""Megatron-Core's ``transformer.module``, ``process_groups_config``, ``RankGenerator`` and
the further ``parallel_state`` accessors, on one process."""

import pytest
import torch

from megatron.core import mpu, parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups import ProcessGroups
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class _Tiny(MegatronModule):
    def __init__(self, config):
        super().__init__(config)
        self.linear = torch.nn.Linear(4, 3)
        self.seen_dtype = None

    def forward(self, x, token_ids):
        self.seen_dtype = (x.dtype, token_ids.dtype)
        return self.linear(x)


def _config(**kwargs):
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, **kwargs)


def test_megatron_module_saves_its_state_dict():
    model = _Tiny(_config())
    assert model.config.hidden_size == 8
    assert model.state_dict_for_save_checkpoint(prefix="m.").keys() == {"m.linear.weight", "m.linear.bias"}


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_float16_module_runs_in_half_and_returns_fp32(flag, dtype):
    inner = _Tiny(_config())
    reference = inner.linear(torch.ones(2, 4)).detach()
    wrapped = Float16Module(_config(**{flag: True}), inner)
    assert wrapped.module.linear.weight.dtype == dtype
    out = wrapped(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))
    assert inner.seen_dtype == (dtype, torch.long)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
    assert set(wrapped.state_dict()) == {"linear.weight", "linear.bias"}
    wrapped.load_state_dict(wrapped.state_dict_for_save_checkpoint())
    with pytest.raises(ValueError, match="fp16 or config.bf16"):
        Float16Module(_config(), _Tiny(_config()))


def test_process_group_collection_is_process_groups():
    marker = object()
    collection = ProcessGroupCollection(tp=marker)
    assert isinstance(collection, ProcessGroups) and collection.tp is marker
    everything = ProcessGroupCollection.use_mpu_process_groups()
    assert {"tp", "pp", "dp", "cp", "ep", "embd", "pos_embd", "dp_cp", "expt_tp", "expt_dp", "tp_cp", "tp_dp_cp"} <= set(everything.names())
    assert ProcessGroupCollection.use_mpu_process_groups(["tp", "pp"]).size("tp") == 1
    with pytest.raises(ValueError, match="unknown process group"):
        ProcessGroupCollection.use_mpu_process_groups(["tensor"])


def test_rank_generator_matches_megatron_layouts():
    generator = parallel_state.RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=1, order="tp-cp-ep-dp-pp")
    assert generator.get_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert generator.get_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert generator.get_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert generator.get_ranks("tp-pp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # size-1 axes may be left out of the order, as Megatron allows.
    short = parallel_state.RankGenerator(tp=2, ep=1, dp=2, pp=1, cp=1, order="tp-dp")
    assert short.get_ranks("dp") == [[0, 2], [1, 3]]
    expert = parallel_state.RankGenerator(tp=1, ep=2, dp=2, pp=1, cp=1, order="tp-ep-dp-pp", rank_offset=4)
    assert expert.get_ranks("ep", independent_ep=True) == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="pp has size 2"):
        parallel_state.RankGenerator(tp=2, ep=1, dp=1, pp=2, cp=1, order="tp-dp")


def test_accessors_on_one_process_and_setters():
    assert mpu.get_tensor_model_parallel_src_rank() == 0
    assert parallel_state.get_pipeline_model_parallel_first_rank() == 0
    assert parallel_state.get_pipeline_model_parallel_next_rank() == 0
    assert parallel_state.get_expert_tensor_parallel_world_size() == 1
    assert parallel_state.get_expert_data_parallel_rank() == 0
    try:
        mpu.set_tensor_model_parallel_world_size(4)
        mpu.set_pipeline_model_parallel_rank(1)
        assert parallel_state.get_tensor_model_parallel_world_size() == 4
        assert not parallel_state.is_pipeline_first_stage()
        mpu.set_tensor_model_parallel_world_size(None)
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
    finally:
        parallel_state.destroy_model_parallel()
    assert parallel_state.get_pipeline_model_parallel_rank() == 0


def test_float16_module_wraps_a_gpt_model():
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, bf16=True)
    wrapped = Float16Module(config, GPTModel(config, vocab_size=64, max_sequence_length=8))
    tokens = torch.randint(0, 64, (2, 8))
    loss = wrapped(tokens, None, None, labels=tokens)
    assert loss.dtype == torch.float32 and loss.shape == (2, 8)
    assert wrapped.sharded_state_dict()["embedding.word_embeddings.weight"].data.dtype == torch.bfloat16
