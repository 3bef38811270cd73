"""Megatron-LM-compatible pretraining framework in pure PyTorch."""

__version__ = "0.1.0"
