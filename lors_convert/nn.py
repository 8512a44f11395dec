"""Runtime LORS modules: which layers can run in LORS form, and merging them back to plain modules. The LORS layer
itself (`LorsLinear`) lives in lors_modeling.py, the file export copies into model folders.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from lors_convert.config import LorsifyConfig
from lors_convert.lors_modeling import SHARED_ATTRIBUTE, LorsLinear

__all__ = [
    "LorsLinear",
    "SHARED_ATTRIBUTE",
    "AdaptiveLors",
    "LORS_LAYERS",
    "lors_layout",
    "is_swappable",
    "is_conv1d",
    "swappable_weights",
    "lorsify",
    "LorsifyConfig",
    "lors_groups",
    "merge_lors",
]


# Which modules run in LORS form, PEFT-style: (does this table entry take the module, is its weight stored
# in x out). Everything that swaps or stacks layers of a model asks it: convert's calibration, load, init, lorsify.
# A stacked conv kernel is none of these: convert factors it in weight space, but no model runs it as LorsLinear.
LORS_LAYERS: tuple[tuple[Callable[[nn.Module], bool], bool], ...] = (
    (lambda module: isinstance(module, nn.Linear), False),
    # GPT-2's transformers.pytorch_utils.Conv1D: a Linear with its weight stored in x out
    (lambda module: type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2, True),
)


def lors_layout(module: nn.Module) -> bool | None:
    """None when the module cannot run as LorsLinear; else whether its weight is stored transposed (in x out)."""
    return next((transposed for takes, transposed in LORS_LAYERS if takes(module)), None)


def is_swappable(module: nn.Module) -> bool:
    return lors_layout(module) is not None


def is_conv1d(module: nn.Module) -> bool:
    return lors_layout(module) is True


def swappable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """`<module path>.weight` of every module that can run as LorsLinear, with the module."""
    return {f"{path}.weight": m for path, m in model.named_modules() if is_swappable(m)}


def merge_lors(model: nn.Module) -> nn.Module:
    """Replace every LorsLinear by a plain nn.Linear (or GPT-2 Conv1D) holding S + B A, built on the meta device
    and given that weight (and the layer's bias). In place."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, LorsLinear):
            continue
        with torch.no_grad():
            weight = module.weight  # a new tensor, S + B A
        bias = module.bias
        with torch.device("meta"):  # no random init of a weight replaced at once
            if module.transposed:  # only GPT-2-style models have these
                from lors_convert.hf import conv1d

                dense = conv1d(weight.shape[0], weight.shape[1])
                bias = nn.Parameter(weight.new_zeros(weight.shape[1])) if bias is None else bias  # it always has one
            else:
                dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        dense.weight = nn.Parameter(weight)
        if bias is not None:
            dense.bias = bias
        model.set_submodule(path, dense)
    if hasattr(model, SHARED_ATTRIBUTE):  # every layer now holds its own weight
        delattr(model, SHARED_ATTRIBUTE)
    return model


def lors_groups(model: nn.Module) -> dict[int, list[LorsLinear]]:
    """The LORS modules of a model, grouped by their shared Parameter (keyed by its id)."""
    groups: dict[int, list[LorsLinear]] = {}
    for module in model.modules():
        if isinstance(module, LorsLinear) and module.shared is not None:
            groups.setdefault(id(module.shared), []).append(module)
    return groups


# ---------------------------------------------------------------- training LORS models from scratch (the paper's form)

INITS = ("scratch", "convert")


def scratch_factors(weight: torch.Tensor, rank: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """B (rows × rank) and A (rank × cols) for a layer trained from scratch, in `weight`'s dtype and device; `weight`
    is a freshly initialised layer of the group. A is kaiming-uniform (nn.Linear's default). B is zeros where S
    carries the layer's function (the paper's init: each layer starts as S); without S that would make every layer
    the zero map, so there B is kaiming-uniform, scaled so that B A has the variance of `weight`."""
    rows, cols = weight.shape
    a = torch.empty(rank, cols, device=weight.device)
    torch.nn.init.kaiming_uniform_(a, a=5**0.5)  # variance 1 / (3 cols)
    b = torch.zeros(rows, rank, device=weight.device)
    if not shared and rank:
        torch.nn.init.kaiming_uniform_(b, a=5**0.5)  # variance 1 / (3 rank): B A has variance 1 / (9 cols)
        b *= (9 * cols * weight.float().var()).sqrt()
    return b.to(weight.dtype), a.to(weight.dtype)


def lorsify(model: nn.Module, config: LorsifyConfig) -> nn.Module:
    """Turn a model's stacked Linear (and GPT-2 Conv1D) layers into LorsLinear, in place; returns the model.

    Stacks are found as in conversion (same name up to one layer index, same shape; `include`/`exclude` are globs
    over the templates). Each group gets one shared matrix S (unless `shared=False`), held by the model under
    `lors_shared`, and per layer rank-`rank` factors B (out×r) and A (r×in):
    - `init="scratch"`, the paper's (`scratch_factors`): S with the layer's own default initialisation,
      A kaiming-uniform, B zeros, so every layer starts as S; without S, B random so that B A has the variance
      of that initialisation (B = 0 would make every layer the zero map);
    - `init="convert"`: S the mean of the group's weights and B A the truncated SVD of each residual.
    A group then has rows·cols (S) + Σ r·(rows + cols) parameters.
    """
    from lors_convert.checkpoint import TensorInfo
    from lors_convert.factorize import low_rank
    from lors_convert.stacks import find_stacks

    rank, shared, init = config.rank, config.shared, config.init
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    modules = swappable_weights(model)
    info = {name: TensorInfo(tuple(m.weight.shape), m.weight.dtype) for name, m in modules.items()}
    stacks, _ = find_stacks(info, config.include, config.exclude)
    holder = getattr(model, SHARED_ATTRIBUTE, None)
    if holder is None:
        holder = nn.ParameterDict()
        setattr(model, SHARED_ATTRIBUTE, holder)
    for stack in stacks:
        dense = [modules[name] for name in stack.names]
        weights = [m.weight.detach() for m in dense]
        r = min(rank, stack.rows, stack.cols)
        key = str(len(holder))
        if init == "scratch":  # a fresh copy of the first layer, re-initialised its own way
            fresh = copy.deepcopy(dense[0])
            reset = getattr(fresh, "reset_parameters", None) or (lambda: nn.init.normal_(fresh.weight, std=0.02))
            reset()
            matrix = fresh.weight.detach()
        elif shared:
            matrix = torch.stack(weights).float().mean(0).to(weights[0].dtype)
        if shared:
            holder[key] = nn.Parameter(matrix.clone())
        for name, layer, weight in zip(stack.names, dense, weights):
            if init == "scratch":
                b, a = scratch_factors(matrix, r, shared)
            else:
                residual = weight.float() - (holder[key].float() if shared else 0)
                b, a = (t.to(weight.dtype) for t in low_rank(residual, r))
            lors = LorsLinear((holder, key) if shared else None, a, b, layer.bias, transposed=is_conv1d(layer))
            model.set_submodule(name.removesuffix(".weight"), lors)
    return model


class AdaptiveLors(nn.Module):
    """Adaptive LORS: the paper's form for a mixing matrix generated from each query (AdaMixer's channel mixing).

    Stage i mixes x with M_i(q), generated from the query q of the tokens being mixed:

        M_i(q) = G(q) + L_i · Z_i(q) · R_i

    - G, the common generator, shared by all stages: Linear(query_dim → in_dim · out_dim), reshaped in × out.
    - Z_i(q), stage i's private core: block-diagonal with `core_groups[i]` blocks of `core_sizes[i]` ×
      `core_sizes[i]`, generated by a per-stage Linear(query_dim → groups · size²).
    - L_i (in_dim × groups·size) and R_i (groups·size × out_dim): static per-stage factors (kaiming-uniform).
    Both generators start at zero (weights and biases), so at initialisation M_i(q) = 0, and while the private
    generators stay zero the module is the plain adaptive generator G shared by every stage.

    Shapes: x (..., P, in_dim) — P tokens (sampled points) per query — and query (..., query_dim) with the same
    leading dims; the result is (..., P, out_dim).
    """

    def __init__(
        self,
        query_dim: int,
        in_dim: int,
        out_dim: int,
        stages: int,
        core_sizes: tuple[int, ...] | int = 32,
        core_groups: tuple[int, ...] | int = (1, 1, 2, 2, 3, 3),
    ):
        super().__init__()
        sizes = (core_sizes,) * stages if isinstance(core_sizes, int) else tuple(core_sizes)
        groups = (core_groups,) * stages if isinstance(core_groups, int) else tuple(core_groups)
        if len(sizes) != stages or len(groups) != stages:
            raise ValueError(f"core_sizes and core_groups need one entry per stage ({stages})")
        self.in_dim, self.out_dim, self.sizes, self.groups = in_dim, out_dim, sizes, groups
        self.common = nn.Linear(query_dim, in_dim * out_dim)
        self.cores = nn.ModuleList(nn.Linear(query_dim, g * k * k) for g, k in zip(groups, sizes))
        self.left = nn.ParameterList(nn.Parameter(torch.empty(in_dim, g * k)) for g, k in zip(groups, sizes))
        self.right = nn.ParameterList(nn.Parameter(torch.empty(g * k, out_dim)) for g, k in zip(groups, sizes))
        for generator in (self.common, *self.cores):
            nn.init.zeros_(generator.weight)
            nn.init.zeros_(generator.bias)
        for factor in (*self.left, *self.right):
            nn.init.kaiming_uniform_(factor, a=5**0.5)

    def mixing(self, query: torch.Tensor, stage: int) -> torch.Tensor:
        """M_stage(q) as a dense (..., in_dim, out_dim) tensor (for inspection; forward never forms the private
        part densely)."""
        g, k = self.groups[stage], self.sizes[stage]
        blocks = self.cores[stage](query).unflatten(-1, (g, k, k))
        private = blocks.new_zeros(*blocks.shape[:-3], g * k, g * k)
        for j in range(g):
            private[..., j * k : (j + 1) * k, j * k : (j + 1) * k] = blocks[..., j, :, :]
        common = self.common(query).unflatten(-1, (self.in_dim, self.out_dim))
        return common + self.left[stage] @ private @ self.right[stage]

    def forward(self, x: torch.Tensor, query: torch.Tensor, stage: int) -> torch.Tensor:
        g, k = self.groups[stage], self.sizes[stage]
        common = self.common(query).unflatten(-1, (self.in_dim, self.out_dim))
        out = x @ common
        core = self.cores[stage](query).unflatten(-1, (g, k, k))  # (..., g, k, k)
        low = (x @ self.left[stage]).unflatten(-1, (g, k))  # (..., P, g, k)
        mixed = torch.einsum("...pgk,...gkl->...pgl", low, core).flatten(-2)  # each group by its own block
        return out + mixed @ self.right[stage]
