"""Shared check of the CUDA-graph form of a KV cache, run eagerly on CPU: prefill through
the ordinary path, switch the context to fixed shapes, decode the rest one token at a time;
every step's logits must equal the full forward's."""

from typing import Callable, Optional

import torch


def assert_fixed_shape_decoding_matches(model, ids: torch.Tensor, context, prefill: int, tol: dict,
                                        after_prefill: Optional[Callable] = None) -> None:
    batch, length = ids.shape
    with torch.no_grad():
        full = model(ids, None, None)
        model(ids[:, :prefill], torch.arange(prefill).expand(batch, -1), None, inference_context=context)
        context.increment(prefill)
        if after_prefill is not None:
            after_prefill(context)
        context.use_fixed_shapes(torch.device("cpu"))
        for p in range(prefill, length):
            got = model(ids[:, p:p + 1], torch.full((batch, 1), p), None, inference_context=context)
            context.increment(1)
            torch.testing.assert_close(got, full[:, p:p + 1], **tol)
