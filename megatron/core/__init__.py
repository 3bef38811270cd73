"""Megatron-Core-compatible library: parallel layers, models, optimizers, data."""
