"""BertModel on CUDA: fp32 Hugging Face parity with padding, and the bf16 padding-mask sdpa
path against the unfused reference, with a backward pass. GPU only."""

import pytest
import torch

from megatron.core import tensor_parallel
from megatron.core.models.bert import BertModel
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.core.models.bert_cases import batch, hf_model, megatron_model


@pytest.mark.gpu
def test_hf_parity_on_cuda_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = hf_model("BertForPreTraining")
    ours = megatron_model(hf)[0].cuda()
    ids, types, mask = (t.cuda() for t in batch())
    with torch.no_grad():
        expected = hf.cuda()(input_ids=ids, token_type_ids=types, attention_mask=mask)
        lm, binary = ours(ids, mask, tokentype_ids=types)
    real = mask.bool()
    # GPU kernels reorder fp32 sums more than the CPU ones: 1e-4 on logits of ~3
    torch.testing.assert_close(lm[real], expected.prediction_logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(binary, expected.seq_relationship_logits, atol=1e-4, rtol=1e-4)


def _bf16_model(backend):
    config = TransformerConfig(
        num_layers=2, hidden_size=256, num_attention_heads=8, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=True, params_dtype=torch.bfloat16, attention_backend=backend,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return BertModel(config, num_tokentypes=2, vocab_size=512, max_sequence_length=512).cuda()


@pytest.mark.gpu
def test_bf16_masked_sdpa_matches_unfused_and_backprops():
    sdpa, unfused = _bf16_model("sdpa"), _bf16_model("unfused")
    unfused.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 512, (4, 512), device="cuda")
    types = torch.zeros_like(ids)
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    mask[3, 17:] = 0
    outputs = [m(ids, mask, tokentype_ids=types) for m in (sdpa, unfused)]
    real = mask.bool()
    # bf16 has an 8-bit mantissa (~4e-3 relative); two layers of differently ordered math
    torch.testing.assert_close(outputs[0][0][real].float(), outputs[1][0][real].float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(outputs[0][1].float(), outputs[1][1].float(), atol=5e-2, rtol=5e-2)
    lm_loss, binary = sdpa(ids, mask, tokentype_ids=types, lm_labels=ids)
    (lm_loss.float().mean() + binary.float().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sdpa.parameters())
