"""Megatron-Core's "simple training loop", written against the names it documents.

A tiny GPT (2 layers, hidden 12) split over 2 tensor-parallel ranks trains for a few steps
on mock data, then saves a distributed checkpoint and loads it back. Every import is the
Megatron-Core path a script ported from Megatron-LM uses, except the null tokenizer (the
project's own ``megatron.training.tokenizer.NullTokenizer``).

    torchrun --nproc-per-node 2 examples/megatron_core/simple_train_loop.py

On CPU it runs over gloo (``--backend gloo`` is chosen when CUDA is absent).
"""

import argparse
import os
import tempfile
from functools import partial

import torch
from torch.utils.data import DataLoader

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import compile_helpers
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.tokenizer import NullTokenizer

_SEQUENCE_LENGTH = 64


def initialize_distributed(tensor_model_parallel_size=1, pipeline_model_parallel_size=1):
    parallel_state.destroy_model_parallel()
    if not torch.distributed.is_initialized():
        rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend, world_size=int(os.environ["WORLD_SIZE"]), rank=rank)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)


def model_provider():
    config = TransformerConfig(
        num_layers=2, hidden_size=12, num_attention_heads=6, use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=100,
        max_sequence_length=_SEQUENCE_LENGTH,
    )


def get_train_data_iterator():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_rank() == 0:
            compile_helpers()
        torch.distributed.barrier()
    config = GPTDatasetConfig(
        random_seed=0, sequence_length=_SEQUENCE_LENGTH, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, tokenizer=NullTokenizer(vocab_size=_SEQUENCE_LENGTH),
    )
    datasets = BlendedMegatronDatasetBuilder(MockGPTDataset, [1000, None, None], lambda: True, config).build()
    return iter(DataLoader(datasets[0], batch_size=8, shuffle=True))


def forward_step_func(data_iterator, model):
    def loss_func(loss_mask, output_tensor):
        losses = output_tensor.float()
        loss_mask = loss_mask.view(-1).float()
        loss = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
        return loss, {"lm loss": loss}

    data = next(data_iterator)
    device = next(model.parameters()).device
    tokens = data["tokens"].to(device)
    attention_mask = data["attention_mask"].to(device)
    position_ids = data["position_ids"].to(device)
    labels = data["labels"].to(device)
    loss_mask = data["loss_mask"].to(device)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def save_distributed_checkpoint(checkpoint_path, gpt_model):
    dist_checkpointing.save(sharded_state_dict=gpt_model.sharded_state_dict(prefix=""), checkpoint_dir=checkpoint_path)


def load_distributed_checkpoint(checkpoint_path, gpt_model):
    sharded_state_dict = gpt_model.sharded_state_dict(prefix="")
    checkpoint = dist_checkpointing.load(sharded_state_dict=sharded_state_dict, checkpoint_dir=checkpoint_path)
    gpt_model.load_state_dict(checkpoint)
    return gpt_model


def main(checkpoint_path, steps=5, tensor_model_parallel_size=2):
    """Train ``steps`` steps, save, load into a fresh model; returns the losses and whether
    the fresh model's parameters equal the trained ones after loading (and before)."""
    initialize_distributed(tensor_model_parallel_size=tensor_model_parallel_size, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(123)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpt_model = model_provider().to(device)
    optim = torch.optim.Adam(gpt_model.parameters())
    train_iterator = get_train_data_iterator()
    forward_backward_func = get_forward_backward_func()
    losses = []
    for _ in range(steps):
        optim.zero_grad()
        losses_reduced = forward_backward_func(
            forward_step_func=forward_step_func, data_iterator=train_iterator, model=gpt_model,
            num_microbatches=1, seq_length=_SEQUENCE_LENGTH, micro_batch_size=8,
            decoder_seq_length=_SEQUENCE_LENGTH, forward_only=False,
        )
        optim.step()
        losses.append(float(losses_reduced[0]["lm loss"].detach()))
    save_distributed_checkpoint(checkpoint_path, gpt_model)
    model_parallel_cuda_manual_seed(321)
    fresh = model_provider().to(device)
    before = _same_parameters(gpt_model, fresh)
    loaded = load_distributed_checkpoint(checkpoint_path, fresh)
    return losses, _same_parameters(gpt_model, loaded), before


def _same_parameters(first, second):
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    # Every rank writes its part into the same directory.
    parser.add_argument("--checkpoint-path", default=os.path.join(tempfile.gettempdir(), "simple_train_loop_ckpt"))
    cli = parser.parse_args()
    step_losses, reloaded, _ = main(cli.checkpoint_path, cli.steps)
    for step, value in enumerate(step_losses):
        print(f"rank {torch.distributed.get_rank()} step {step}: lm loss {value:.4f}")
    print(f"rank {torch.distributed.get_rank()}: checkpoint reloaded {'exactly' if reloaded else 'WITH DIFFERENCES'}")
    torch.distributed.destroy_process_group()
