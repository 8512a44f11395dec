"""Runtime LORS modules: swap a model's stacked Linear / GPT-2 Conv1D modules for ones computing with
S + B_i A_i, one shared nn.Parameter per group, and merge them back to plain modules.

Plain PyTorch; the model comes from `hf.py` (or --model-factory) with the dense architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHARED_ATTRIBUTE = "lors_shared"  # the model's nn.ParameterDict of shared matrices, one per group


class LorsLinear(nn.Module):
    """y = x Wᵀ + b with W = S + B A (nn.Linear layout: S out×in, B out×r, A r×in), or, for GPT-2's Conv1D
    (`transposed`, weights stored in×out), y = x W + b with S in×out, B in×r, A r×out.

    The weight is materialised before the matmul rather than computing x·Sᵀ + (x·Aᵀ)·Bᵀ. Measured with
    scripts/bench_lors_forward.py (forward + backward of one layer, MiniLM shapes 384x384 r96, 1536x384 and
    384x1536 r160, float32, 2-core shared CPU): at 8192 tokens per batch materialised took 0.92-1.20x the
    dense layer's time and factored 1.43-1.60x; at 2048 tokens 0.91-1.37x against 1.00-1.82x. B A costs
    out·in·r flops once per step, while the factored form pays N·r·(out + in) for each of N tokens and
    two more thin matmuls in the backward. Only with a few tokens (16: decoding) was factored ahead;
    fine-tuning batches are far above that.
    """

    def __init__(
        self,
        shared: tuple[nn.ParameterDict, str] | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: nn.Parameter | None,
        transposed: bool = False,
    ):
        super().__init__()
        # Where the group's one shared Parameter lives: (the model's lors_shared dict, the group's key), or None for
        # --shared none. Looked up at each use, so it stays right when loading replaces the Parameter; a tuple keeps
        # nn.Module from registering the dict here again.
        self._shared = shared
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(lora_b)
        self.bias = bias
        self.transposed = transposed

    @property
    def shared(self) -> nn.Parameter | None:
        if self._shared is None:
            return None
        holder, key = self._shared
        return holder[key]

    def weight(self) -> torch.Tensor:
        if self.shared is None:
            return self.lora_B @ self.lora_A
        return torch.addmm(self.shared, self.lora_B, self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight()
        return F.linear(x, weight.t() if self.transposed else weight, self.bias)

    def extra_repr(self) -> str:
        rows, cols = self.lora_B.shape[0], self.lora_A.shape[1]
        rank = self.lora_A.shape[0]
        return f"{rows}x{cols}, shared={self.shared is not None}, rank={rank}, transposed={self.transposed}"


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
