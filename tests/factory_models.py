"""A model that is not from Hugging Face, for --model-factory tests: `layers.N` stacked Linear blocks."""

from torch import nn


class StackedMLP(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.norm(x)


def stacked_mlp() -> nn.Module:
    return StackedMLP()
