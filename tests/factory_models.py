"""Models that are not from Hugging Face, for --model-factory tests: `layers.N` stacked Linear blocks, and
Swin-style nested indices (`layers.S.blocks.B`)."""

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


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class NestedStages(nn.Module):
    """Stages of blocks, as Swin names them: `layers.S.blocks.B.0.weight`; each stage's blocks make a group."""

    def __init__(self, dim: int = 16, stages: int = 2, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Stage(dim, depth) for _ in range(stages))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)


def nested_stages() -> nn.Module:
    return NestedStages()
