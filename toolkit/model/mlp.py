"""Feed-forward block: GeLU (reference default), squared ReLU (NemotronH / GPT baseline), SwiGLU."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

from toolkit.config import MLP_ACTIVATIONS as ACTIVATIONS


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown MLP activation {activation!r}: expected one of {ACTIVATIONS}"
            )
        self.activation = activation
        fc1_rows = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.linear_fc1 = nn.Linear(hidden_size, fc1_rows, bias=False)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: None = None) -> torch.Tensor:
        if self.activation == "swiglu":  # fc1 rows are [gate; up], as in Megatron
            gate, up = self.linear_fc1(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = linear_activation(self.linear_fc1, x, self.activation)
        return self.linear_fc2(h)


def linear_activation(linear: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(linear(x)) for 'gelu' and 'relu2'. A TorchFunctionMode may take the pair
    whole: the decode step's matrix-vector kernel applies the activation to its sums
    (toolkit/inference/gemv.py)."""
    if has_torch_function((x,)):
        return handle_torch_function(linear_activation, (x,), linear, x, activation)
    return activate(linear(x), activation)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(h) if activation == "gelu" else F.relu(h).square()
