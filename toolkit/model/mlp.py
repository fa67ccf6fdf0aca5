"""Feed-forward block: GeLU (reference default), squared ReLU (NemotronH / GPT baseline), SwiGLU."""

import torch
import torch.nn.functional as F
from torch import nn

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
        h = self.linear_fc1(x)
        if self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:  # swiglu: fc1 rows are [gate; up], as in Megatron
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.linear_fc2(h)
