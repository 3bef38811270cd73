"""checkpoint(..., distribute_saved_activations=True) on 2 tensor-parallel ranks: the same
gradients as keeping the whole input, while each rank stores half of it."""

import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import checkpoint, model_parallel_cuda_manual_seed
from tests.multirank import run_on_ranks


def _block(x, w):
    return torch.nn.functional.gelu(x @ w).sum(dim=-1, keepdim=True) * x


def _grads(distribute, tp_group):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 8, generator=gen, requires_grad=True)  # odd numel: exercises padding
    w = torch.randn(8, 8, generator=gen, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = checkpoint(lambda a: _block(a, w), distribute, x, tp_group=tp_group)
    out.square().sum().backward()
    return x.grad.clone(), w.grad.clone(), saved


def _compare(rank, world_size):
    groups = parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1234)
    x_plain, w_plain, saved_plain = _grads(False, groups.tp)
    x_dist, w_dist, saved_dist = _grads(True, groups.tp)
    return x_plain, w_plain, saved_plain, x_dist, w_dist, saved_dist


def test_distributed_saved_input_gives_the_same_grads_with_half_the_memory():
    for x_plain, w_plain, saved_plain, x_dist, w_dist, saved_dist in run_on_ranks(_compare, 2):
        # the recompute sees a bit-identical input, so the gradients are bit-identical
        assert torch.equal(x_plain, x_dist) and torch.equal(w_plain, w_dist)
        assert saved_plain[0] == 7 * 3 * 8
        assert saved_dist[0] == -(-7 * 3 * 8 // 2)  # one half, rounded up
