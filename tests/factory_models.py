"""Models that are not from Hugging Face, for --model-factory tests: `layers.N` stacked Linear blocks, Swin-style
nested indices (`layers.S.blocks.B`), mixtures of experts routed by position or by content, a tiny
transformers T5, stacked conv kernels and stacks of two dtypes."""

import torch
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


# Which expert each of a sequence's 6 positions goes to, per block: the experts see different token counts, and
# block 1's expert 3 sees none
ROUTES = ((0, 1, 1, 2, 2, 3), (0, 1, 1, 2, 2, 2))


class RoutedBlock(nn.Module):
    def __init__(self, dim: int, route: tuple[int, ...], experts: int = 4):
        super().__init__()
        self.route = route
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))

    def forward(self, x):
        out = x.clone()
        for e, expert in enumerate(self.experts):
            positions = [t for t in range(x.shape[1]) if self.route[t % len(self.route)] == e]
            if positions:  # an expert no token is routed to does not run, as in a real MoE
                out[:, positions] = x[:, positions] + torch.tanh(expert(x[:, positions]))
        return out


class RoutedExperts(nn.Module):
    """A tiny MoE whose tokens are routed by position (ROUTES): `blocks.K.experts.E`, each block's experts a group."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(RoutedBlock(dim, route) for route in ROUTES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def routed_experts() -> nn.Module:
    return RoutedExperts()


def tiny_t5() -> nn.Module:
    """A random 3-block T5 (transformers): encoder and decoder blocks, decoder blocks reading the encoder's
    outputs, and a position bias the first block computes and hands to the others."""
    import transformers

    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, initializer_factor=4.0
    )
    return transformers.T5ForConditionalGeneration(config)


class ContentRoutedBlock(nn.Module):
    """Each token goes to the expert named by the largest of its first `experts` channels, which the experts leave
    as they are: which experts an example reaches depends on its values, as in a real MoE, and is the same in every
    block (and in a student and its teacher)."""

    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))

    def forward(self, x):
        route, kept = x[..., : len(self.experts)].argmax(-1), len(self.experts)
        out = x.clone()
        for e, expert in enumerate(self.experts):
            tokens = route == e
            if tokens.any():  # an expert no token is routed to does not run
                out[tokens, kept:] = x[tokens, kept:] + torch.tanh(expert(x[tokens]))[:, kept:]
        return out


class ContentRoutedExperts(nn.Module):
    """4 blocks of 3 experts: `blocks.{i}.experts.E` stack over the blocks, so each expert's 4 copies are a group."""

    def __init__(self, dim: int = 8, blocks: int = 4, experts: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(ContentRoutedBlock(dim, experts) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def content_routed_experts() -> nn.Module:
    return ContentRoutedExperts()


class ConvStack(nn.Module):
    """Stacked 3x3 convolutions, `convs.N`: convert factors their kernels as out x (in·3·3) matrices, which no model
    runs in LORS form."""

    def __init__(self, channels: int = 8, layers: int = 3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers))

    def forward(self, x):
        for conv in self.convs:
            x = x + torch.tanh(conv(x))
        return x


def conv_stack() -> nn.Module:
    return ConvStack()


class MixedDtypes(nn.Module):
    """A bfloat16 stack (`attn.N`) and a float32 one (`mlp.N`), each layer run in its own weight's dtype."""

    def __init__(self, dim: int = 16, layers: int = 3):
        super().__init__()
        self.attn = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers)).to(torch.bfloat16)
        self.mlp = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x.to(attn.bias.dtype)).to(x.dtype)
            x = x + torch.tanh(mlp(x))
        return x


def mixed_dtypes() -> nn.Module:
    return MixedDtypes()
