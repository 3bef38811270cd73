"""MLP activation functions that torch.nn.functional does not name directly."""

import torch
import torch.nn.functional as F


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """GeLU with the tanh approximation (GPT-2's ``gelu_new``, --openai-gelu)."""
    return F.gelu(x, approximate="tanh")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (--squared-relu)."""
    return torch.pow(F.relu(x), 2)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) (--quick-geglu's activation)."""
    return x * torch.sigmoid(1.702 * x)
