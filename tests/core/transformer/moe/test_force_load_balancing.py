"""--moe-router-force-load-balancing: routing by random logits spreads tokens evenly over
the experts whatever the router's weights, repeats with the seed, and still trains the
router (the gradient passes straight through)."""

import torch

from megatron.core.transformer.moe.router import TopKRouter
from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import core_transformer_config_from_args
from tests.core.transformer.moe.moe_cases import EXPERTS, HIDDEN, moe_config

TOKENS = 4096


def _routing(force: bool, seed: int = 0):
    router = TopKRouter(moe_config(moe_router_force_load_balancing=force), layer_number=1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0].fill_(1.0)  # every token prefers expert 0 by far
    tokens = torch.ones(TOKENS, HIDDEN, requires_grad=True)
    torch.manual_seed(seed)
    probs, routing_map = router(tokens)
    return router, probs, routing_map


def test_tokens_spread_evenly_whatever_the_weights():
    _, _, skewed = _routing(False)
    assert skewed[:, 0].all()  # without the flag: expert 0 takes every token
    _, _, forced = _routing(True)
    counts = forced.sum(dim=0).float()
    expected = TOKENS * 2 / EXPERTS  # top-2
    assert counts.sum() == TOKENS * 2
    assert ((counts - expected).abs() < 0.1 * expected).all(), counts


def test_same_seed_same_routes_and_the_router_still_learns():
    router, probs, first = _routing(True, seed=5)
    _, _, again = _routing(True, seed=5)
    _, _, other = _routing(True, seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    probs.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_flag_reaches_the_config():
    argv = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
            "--micro-batch-size 2 --num-experts 4 --moe-router-force-load-balancing").split()
    config = core_transformer_config_from_args(parse_and_validate(argv, world_size=1, rank=0))
    assert config.moe_router_force_load_balancing is True
