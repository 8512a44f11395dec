"""Runtime LORS modules: which layers can run in LORS form, and merging them back to plain modules. The LORS layer
itself (`LorsLinear`) lives in lors_modeling.py, the file export copies into model folders.
"""

from __future__ import annotations

import torch
from torch import nn

from lors_convert.lors_modeling import SHARED_ATTRIBUTE, LorsLinear

__all__ = ["LorsLinear", "SHARED_ATTRIBUTE", "is_swappable", "is_conv1d", "merge_lors", "lors_groups"]


def is_swappable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D (a Linear with its weight stored in×out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def merge_lors(model: nn.Module) -> nn.Module:
    """Replace every LorsLinear by a plain nn.Linear (or GPT-2 Conv1D) holding S + B A. In place."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, LorsLinear):
            continue
        with torch.no_grad():
            weight = module.weight().detach().clone()
        has_bias = module.bias is not None
        if module.transposed:
            from transformers.pytorch_utils import Conv1D  # only GPT-2-style models have these

            dense = Conv1D(weight.shape[1], weight.shape[0])
        else:
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        dense = dense.to(weight.device)
        dense.weight = nn.Parameter(weight)
        if has_bias:
            dense.bias = module.bias
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
